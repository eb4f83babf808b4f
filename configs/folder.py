r"""GLARE continual pre-training on a folder of your own images (README, "Your own images").

    python -m glare_jax.data.prepare --dataset=folder --name=tiles --images=~/tiles
    python -m glare_jax.main --config=configs/folder.py:name=tiles --workdir=runs/tiles_glare \
        --config.init_checkpoint=ckpt/udi_s16

`name=NAME` picks the prepared dataset `folder/NAME` (in `--config.data_dir`);
`init_checkpoint` is a checkpoint converted with `python -m glare_jax.convert`.
Everything else is the paper's LoveDA run (configs/loveda.py): ViT-S/16 with
adapters, 100 epochs at batch 512, 224 / 96 px crops of images of any size of at
least 224 px (smaller ones are refused, or upsampled by prepare's --min_size).
Other arguments combine as in every config: `configs/folder.py:name=tiles,tiny`
(a minutes-long CPU smoke run), `:name=tiles,objective=udi`, `:name=tiles,fast`.
Fine-tune the result with configs/folder_seg.py when the images have masks.
"""

from glare_jax.configs import common


def split_name(arg: str | None, config: str) -> tuple[str, str]:
  """'name=tiles,tiny' -> ('tiles', 'tiny'); a clear error without a name."""
  items = [i for i in (arg or "").split(",") if i]
  names = [i.partition("=")[2] for i in items if i.partition("=")[0] == "name"]
  if len(names) != 1 or not names[0]:
    raise ValueError(f"{config} needs the prepared dataset's name once: "
                     f"--config={config}:name=NAME (see its docstring)")
  return names[0], ",".join(i for i in items if i.partition("=")[0] != "name")


def get_config(arg: str | None = None):
  name, rest = split_name(arg, "configs/folder.py")
  return common.pretrain_config(f"folder/{name}", rest)
