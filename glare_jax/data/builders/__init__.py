"""TFDS builders (array_record files, no TensorFlow) for every dataset we train on.

`get_builder(name, data_dir)` returns the builder of a dataset in
`glare_jax.data.datasets`, or of a folder of your own images, `folder/NAME`
(`folder.py`); `python -m glare_jax.data.prepare` runs it.
"""

from __future__ import annotations

import os

import tensorflow_datasets as tfds

from glare_jax.data.builders import folder
from glare_jax.data.builders.ade20k import ADE20k
from glare_jax.data.builders.cityscapes import Cityscapes
from glare_jax.data.builders.common import LayoutError
from glare_jax.data.builders.demo import Demo
from glare_jax.data.builders.demo_source import DemoSource
from glare_jax.data.builders.folder import Folder
from glare_jax.data.builders.loveda import LoveDA
from glare_jax.data.builders.pascal_context import PascalContext

BUILDERS: dict[str, type[tfds.core.GeneratorBasedBuilder]] = {
    cls.name: cls for cls in (LoveDA, ADE20k, Cityscapes, PascalContext, Demo, DemoSource,
                              Folder)}


def get_builder(name: str, data_dir: os.PathLike | str, **kwargs
                ) -> tfds.core.GeneratorBasedBuilder:
  """The builder of dataset `name` writing to / reading from `data_dir`."""
  if name.startswith(folder.PREFIX):
    return Folder(config=name[len(folder.PREFIX):],
                  data_dir=os.path.expanduser(os.fspath(data_dir)), **kwargs)
  if name == Folder.name:
    raise ValueError(f"a folder dataset is named {folder.PREFIX}NAME, not {name!r}")
  if name not in BUILDERS:
    raise ValueError(f"unknown dataset {name!r}; known: {sorted(BUILDERS)}")
  return BUILDERS[name](data_dir=os.path.expanduser(os.fspath(data_dir)), **kwargs)


__all__ = ["ADE20k", "BUILDERS", "Cityscapes", "Demo", "DemoSource", "Folder", "LayoutError",
           "LoveDA", "PascalContext", "get_builder"]
