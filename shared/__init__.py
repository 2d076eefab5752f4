"""Code both services and the admin CLI share: config, keys, grants, policy, models, storage."""
