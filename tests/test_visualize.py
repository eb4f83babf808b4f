"""The attention visualiser: maps against the torch reference, regions, the figure,
pre-training workdirs and input errors."""

import json

import jax
import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")

import torch_vit as tv  # noqa: E402
from reference_images import normalise, write_png  # noqa: E402

from configs import demo as demo_config  # noqa: E402
from glare_jax import convert, testing, visualize  # noqa: E402
from glare_jax.models import build_models, init_params  # noqa: E402
from glare_jax.models.vit import cls_patch_attention  # noqa: E402
from glare_jax.train import checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def udi(tmp_path_factory):
  """A random tiny UDI checkpoint, converted; and the torch ViT holding its teacher."""
  d = tmp_path_factory.mktemp("udi")
  testing.write_udi_checkpoint(d / "udi.pth", seed=3)
  assert convert.main(["--src", str(d / "udi.pth"), "--out", str(d / "ckpt")]) == 0
  teacher = testing.udi_state_dicts(seed=3)["teacher"]
  vit = tv.ViT(**{k: tv.TINY[k] for k in ("d", "depth", "heads", "mlp")}, num_prefix=2,
               grid=tv.TINY["grid"])
  vit.load_state_dict({k[len("backbone.backbone."):]: torch.from_numpy(v)
                       for k, v in teacher.items() if k.startswith("backbone.backbone.")})
  return d / "ckpt", vit


def check_regions(res, sizes):
  heads, h, w = res["maps"].shape
  np.testing.assert_array_equal(res["start"], res["maps"].reshape(heads, -1).argmax(-1))
  for (top, left, rows, cols), start in zip(res["box"], res["start"]):
    r, c = divmod(int(start), w)
    assert min(sizes[0], h) <= rows <= min(sizes[1], h)
    assert min(sizes[0], w) <= cols <= min(sizes[1], w)
    assert 0 <= top and top + rows <= h and 0 <= left and left + cols <= w
    assert top <= r < top + rows and left <= c < left + cols   # the start is inside


def test_maps_match_torch_and_regions_hold_their_start(udi, tmp_path):
  ckpt, vit = udi
  backbone = visualize.load_backbone(ckpt)
  assert backbone.regions == (2, 6)   # glare_jax/configs/common.py defaults
  pixels = write_png(tmp_path / "a.png", 96, 128, 0)
  res = visualize.attention_regions(backbone, normalise(pixels), seed=0, sizes=(2, 3))
  _, attn = tv.torch_forward(vit, normalise(pixels)[None])
  np.testing.assert_allclose(res["maps"], attn[0, :, 0, 2:].reshape(2, 6, 8), atol=1e-5)
  check_regions(res, (2, 3))
  again = visualize.attention_regions(backbone, normalise(pixels), seed=0, sizes=(2, 3))
  np.testing.assert_array_equal(res["box"], again["box"])
  boxes = {tuple(visualize.attention_regions(backbone, normalise(pixels), seed=s,
                                             sizes=(2, 3))["box"].ravel()) for s in range(6)}
  assert len(boxes) > 1   # the seed draws the sizes and offsets


def test_colormap_end_points_and_interpolation():
  cm = visualize.colormap(np.array([0.0, 1.0, 0.5, -1.0, 2.0]))
  v = visualize.VIRIDIS
  np.testing.assert_array_equal(cm[0], v[0])
  np.testing.assert_array_equal(cm[1], v[-1])
  np.testing.assert_array_equal(cm[2], np.round((v[4] + v[5]) / 2))   # 0.5 * 9 = 4.5
  np.testing.assert_array_equal(cm[3:], v[[0, -1]])   # clipped


def test_figure_layout_heat_and_regions():
  """One row of [image, head 0, head 1] at 2x the 4x6 grid: heat blocks and outlines."""
  maps = np.zeros((2, 4, 6), np.float32)
  maps[0, 3, 5], maps[0, 0, 0] = 1.0, 0.5     # head 0: argmax bottom right
  maps[1, 0, 1] = 1.0
  res = dict(maps=maps, start=np.array([23, 1]),
             box=np.array([[2, 3, 2, 3], [0, 0, 3, 2]]))
  pixels = np.full((64, 96, 3), 128, np.uint8)
  fig = np.asarray(visualize.render([pixels, pixels], [res, res], ["a", "b"], height=32))
  g, cap = visualize.GAP, visualize.CAPTION
  assert fig.shape == (2 * (cap + 32) + g, 3 * 48 + 2 * g, 3)
  x0 = 48 + g                                  # head 0 panel; 8 px per patch
  np.testing.assert_array_equal(fig[cap + 8 + 4, x0 + 8 + 4], visualize.VIRIDIS[0])
  np.testing.assert_array_equal(fig[cap + 4, x0 + 4], visualize.colormap(np.array(0.5)))
  np.testing.assert_array_equal(fig[cap + 3 * 8 + 1, x0 + 5 * 8 + 1], visualize.VIRIDIS[-1])
  red = visualize.PALETTE[0]                   # head 0's region: rows 2-3, cols 3-5
  np.testing.assert_array_equal(fig[cap + 2 * 8, x0 + 4 * 8], red)         # top edge
  np.testing.assert_array_equal(fig[cap + 3 * 8, x0 + 3 * 8], red)         # left edge
  np.testing.assert_array_equal(fig[cap + 3 * 8, 3 * 8], red)              # image panel too
  np.testing.assert_array_equal(fig[cap + 2 * 8 + 3, x0 + 4 * 8], (0, 0, 0))  # halo inside
  np.testing.assert_array_equal(fig[cap + 3 * 8 + 4, x0 + 5 * 8 + 4], red)   # start dot
  np.testing.assert_array_equal(fig[cap + 1, 2 * x0 + 1], visualize.PALETTE[1])  # head 1
  np.testing.assert_array_equal(fig[cap + 32 + g + cap + 4, 4], (128, 128, 128))  # row 2


def test_cli_writes_one_row_per_image(udi, tmp_path, capsys):
  ckpt, _ = udi
  for i in range(2):
    write_png(tmp_path / f"{i}.png", 50 + 10 * i, 70, i)
  out = tmp_path / "fig" / "attn.png"
  code = visualize.main(["--checkpoint", str(ckpt), "--out", str(out), "--size", "64",
                         "--panel-height", "40", "--demo-images", "1",
                         str(tmp_path / "0.png"), str(tmp_path / "1.png")])
  assert code == 0, capsys.readouterr().err
  with Image.open(out) as im:
    assert im.size == (3 * 40 + 2 * visualize.GAP,
                       3 * (visualize.CAPTION + 40) + 2 * visualize.GAP)
  assert "3 image(s) x 2 heads" in capsys.readouterr().out
  with pytest.raises(SystemExit):   # nothing to draw
    visualize.main(["--checkpoint", str(ckpt), "--out", str(out)])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A pre-training workdir as the trainer writes it (config.json, Checkpointer steps 1
  and 2) whose teacher differs from its student; regions of at most 3 patches."""
  d = tmp_path_factory.mktemp("run")
  config = demo_config.get_config()
  config.glare.regions.max_patches = 3
  checkpoint.check_config(config, d)
  models = build_models(config)
  shapes = jax.eval_shape(lambda k: init_params(models, k, config), jax.random.key(0))
  rng = np.random.default_rng(0)
  random_params = lambda: jax.tree.map(   # fresh values from the shapes: no slow init
      lambda s: (0.5 * rng.standard_normal(s.shape)).astype(s.dtype), shapes)
  states = {}
  for step in (1, 2):
    states[step] = dict(params=random_params(), teacher=random_params(), step=np.int32(step))
    with checkpoint.Checkpointer(d, every_steps=1, keep=5) as ckpt:
      ckpt.save(step, states[step])
  return d, config, models, states[2]


def test_workdir_uses_the_latest_teacher_and_its_region_sizes(workdir, tmp_path):
  d, config, models, last = workdir
  image = normalise(write_png(tmp_path / "a.png", 64, 64, 1))

  def reference(net):
    _, aux = models.teacher.apply({"params": last[net]["backbone"]}, image[None])
    return np.asarray(cls_patch_attention(aux["attn"], 2)[0]).reshape(2, 4, 4)

  for which, net in (("teacher", "teacher"), ("student", "params")):
    backbone = visualize.load_backbone(d, which)
    assert backbone.regions == (2, 3)
    assert "step 2" in backbone.description
    res = visualize.attention_regions(backbone, image)
    np.testing.assert_allclose(res["maps"], reference(net), atol=1e-5)
    check_regions(res, (2, 3))
  assert not np.allclose(reference("teacher"), reference("params"), atol=1e-3)


def run_cli(*args, capsys):
  code = visualize.main([*map(str, args)])
  return code, capsys.readouterr().err


def test_errors_name_the_bad_input(udi, workdir, tmp_path, capsys):
  ckpt, _ = udi
  good = tmp_path / "ok.png"
  write_png(good, 32, 32, 0)
  (tmp_path / "bad.png").write_bytes(b"not an image")
  out = tmp_path / "o.png"

  code, err = run_cli("--checkpoint", ckpt, "--out", out, tmp_path / "bad.png", capsys=capsys)
  assert code == 2 and "bad.png" in err and "cannot read" in err
  code, err = run_cli("--checkpoint", ckpt, "--out", out, tmp_path / "nope.png", capsys=capsys)
  assert code == 2 and "nope.png" in err
  write_png(tmp_path / "odd.png", 30, 32, 0)
  code, err = run_cli("--checkpoint", ckpt, "--out", out, tmp_path / "odd.png", capsys=capsys)
  assert code == 2 and "multiple of the patch size" in err
  code, err = run_cli("--checkpoint", ckpt, "--out", out, "--demo-images", "1", "--size", "40",
                      capsys=capsys)
  assert code == 2 and "40x40 is not a multiple of the patch size 16" in err
  code, err = run_cli("--checkpoint", tmp_path / "missing", "--out", out, good, capsys=capsys)
  assert code == 2 and "missing: no such directory" in err
  code, err = run_cli("--checkpoint", tmp_path, "--out", out, good, capsys=capsys)
  assert code == 2 and "neither a converted checkpoint" in err
  code, err = run_cli("--checkpoint", ckpt, "--out", out, "--min-patches", "4",
                      "--max-patches", "2", good, capsys=capsys)
  assert code == 2 and "min_patches <= max_patches" in err

  tv.convert_file(tmp_path, tv.make_layout("flsl", tv.TINY, grid=4)[0], name="flsl")
  code, err = run_cli("--checkpoint", tmp_path / "flsl", "--out", out, good, capsys=capsys)
  assert code == 2 and "no [CLS] token" in err

  empty = tmp_path / "empty_run"
  empty.mkdir()
  (empty / "config.json").write_text((workdir[0] / "config.json").read_text())
  code, err = run_cli("--checkpoint", empty, "--out", out, good, capsys=capsys)
  assert code == 2 and "no finished checkpoint" in err
  other = tmp_path / "other_run"
  other.mkdir()
  (other / "config.json").write_text(json.dumps({"mode": "bench"}))
  code, err = run_cli("--checkpoint", other, "--out", out, good, capsys=capsys)
  assert code == 2 and "mode 'bench'" in err
  assert not out.exists()
