r"""The miniature Table 1 on generated data: source model -> continual step -> segmentation.

One command runs every stage, every row and every seed (scripts/mini_table.py):

  python scripts/mini_table.py --workdir=/tmp/mini_table

The stages, each a config of this file (the script sets init_checkpoint):

  stage=source      UDI's objective from scratch on `demo_source` (the stand-in for
                    UDI on ImageNet): the demo's tiny ViT without adapters, every
                    weight trained, 40 epochs of 256 images; the dense linear probe
                    on the source domain every 5 epochs shows what it learns.
  (default)         continual pre-training on `demo` (the target, the stand-in for
                    LoveDA) from the source model's teacher, adapters + head +
                    cross-attention trained: objective=udi|flsl|glare, and GLARE's
                    levels=glob|glob_loc|glob_reg|reg_loc|all (Table 5); 10 epochs,
                    the probe at step 0, epoch 5 and the end.
  stage=seg         the FPN fine-tune of configs/demo_seg.py, 150 steps, scored once
                    on the 64 validation images.
  quick             every stage a few steps long (a smoke run of the recipe).

e.g. `configs/demo_mini.py:objective=glare,levels=glob_reg`. Hardware, time and
what the table shows: README.md, "A miniature Table 1".
"""

from glare_jax.configs import common, seg_common

demo = common.sibling(__file__, "demo")
demo_seg = common.sibling(__file__, "demo_seg")


def get_config(arg: str | None = None):
  a = common.parse_arg(arg, stage="continual", objective="glare", levels="all", quick=False)
  if a.stage == "seg":
    return _seg(a.quick)
  if a.stage not in ("source", "continual"):
    raise ValueError(f"stage={a.stage!r}: use 'source', 'continual' or 'seg'")
  source = a.stage == "source"
  c = demo.get_config(f"objective={'udi' if source else a.objective},levels={a.levels}")
  c.tensorboard = False
  c.probe.every_epochs = 5
  if source:
    c.dataset = "demo_source"
    c.model.adapter_mode = "none"       # a plain ViT, as UDI's
    c.optim.param_preset = "full"       # every weight trained
    c.optim.warmup_epochs = 5
    c.loss.warmup_teacher_temp_epochs = 10
    c.num_epochs = 40
  else:
    c.num_epochs = 10
  if a.quick:
    c.num_epochs = 2
    c.probe.every_epochs = 1
    c.probe.max_train_images = 32
    c.probe.max_val_images = 16
  return c


def _seg(quick: bool):
  c = demo_seg.get_config()
  c.tensorboard = False
  seg_common.set_schedule(c, total_steps=150, warmup_steps=15)
  c.eval.every_steps = 0                # scored once, at the end
  c.checkpoint_every_steps = 150
  c.log_every_steps = 50
  if quick:
    seg_common.set_schedule(c, total_steps=6, warmup_steps=2)
    c.eval.every_steps = 0
    c.eval.max_images = 8
    c.log_every_steps = 3
  return c
