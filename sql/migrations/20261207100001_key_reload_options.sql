-- migrate:up
-- A key may send the options that make Ollama reload a model every tenant shares (num_gpu,
-- num_batch, main_gpu, use_mmap, num_thread; native `shift`) only when allowed.
ALTER TABLE api_keys ADD COLUMN allow_reload_options boolean NOT NULL DEFAULT false;

-- migrate:down
ALTER TABLE api_keys DROP COLUMN allow_reload_options;
