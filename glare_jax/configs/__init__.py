"""Config builders, presets and rule tables (the library's part of the configs).

The experiment files in the repository's top-level `configs/` hold values only:
they call `common.pretrain_config` / `seg_common.finetune_config` and change
fields, and import nothing but `glare_jax` and `ml_collections`, so
`--config=/abs/path/configs/loveda.py` works from any directory (docs/DESIGN.md,
"Configs").
"""
