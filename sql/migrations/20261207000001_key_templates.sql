-- migrate:up
-- A key may send /api/generate's `template` and `_debug_render_only` only when allowed: a client
-- template expands without bound, and a debug render shows the model's Modelfile SYSTEM prompt.
ALTER TABLE api_keys ADD COLUMN allow_templates boolean NOT NULL DEFAULT false;

-- migrate:down
ALTER TABLE api_keys DROP COLUMN allow_templates;
