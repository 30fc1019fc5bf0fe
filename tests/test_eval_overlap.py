"""The train / evaluation overlap audit (issue 26): a training output built by the test (`pipeline_out`:
astronaut, coffee and chelsea photos, 96 px JPEGs in OUT/data) against evaluation sets that share one
image, stored resized and re-encoded (PNG at another size), so only a perceptual hash finds it."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from annotate.train.benchmarks import read_task
from annotate.train.overlap import DEFAULT_THRESHOLD, dhash, exclude_images, hamming, task_images

pytestmark = pytest.mark.usefixtures("one_thread")


def _photo(name: str, side: int) -> Image.Image:
    from skimage import data as skdata

    a = getattr(skdata, name)()
    im = Image.fromarray(a if a.ndim == 3 else np.stack([a] * 3, -1)).convert("RGB")
    im.thumbnail((side, side))
    return im


def _copy_of_train_image(path, side=150):
    """The training output's astronaut (its 96 px JPEG as stored), upscaled to `side` and saved as PNG."""
    from bench.train_data import _jpeg, _photo as train_photo

    stored = Image.open(io.BytesIO(_jpeg(train_photo("astronaut", 96)[0])))
    path.parent.mkdir(parents=True, exist_ok=True)
    stored.resize((side, side), Image.BICUBIC).save(path)


def _urban(root):
    """Urban1k layout: the astronaut copy plus two photos the training output does not hold."""
    _copy_of_train_image(root / "image" / "0.png")
    for n, name in ((1, "rocket"), (2, "camera")):
        _photo(name, 120).save(root / "image" / f"{n}.jpg", quality=80)
    (root / "caption").mkdir(parents=True, exist_ok=True)
    for n in range(3):
        (root / "caption" / f"{n}.txt").write_text(f"a scene number {n}")


def test_dhash_is_perceptual_and_separates_other_photos(tmp_path):
    """A resize + re-encode keeps the hash within the threshold; different photos are far apart."""
    original = _photo("astronaut", 96)
    buf = io.BytesIO()
    original.resize((200, 200), Image.BICUBIC).save(buf, format="JPEG", quality=60)
    copy = Image.open(buf)
    others = [_photo(n, 96) for n in ("coffee", "rocket", "camera", "coins")]
    h = np.array([dhash(original), dhash(copy)] + [dhash(o) for o in others], dtype=np.uint64)
    d = hamming(h, h)
    assert d[0, 1] <= DEFAULT_THRESHOLD
    assert (d[0, 2:] > 2 * DEFAULT_THRESHOLD).all() and (d[1, 2:] > 2 * DEFAULT_THRESHOLD).all()
    assert dhash(np.asarray(original)) == dhash(original) and 0 <= dhash(original) < 2**64


def test_audit_finds_the_shared_image_and_exclusion_leaves_it_out(tmp_path, pipeline_out):
    from annotate.train.eval_tasks import audit_and_exclude

    _urban(tmp_path / "urban")
    task = read_task("urban1k", tmp_path / "urban")
    kept, audit = audit_and_exclude(task, pipeline_out, tmp_path / "urban", exclude=False)
    assert audit["train_images"] == 3 and audit["eval_images"] == 3
    assert audit["count"] == 1 and audit["ids"] == ["image/0.png"]
    assert audit["matches"][0]["train_image_key"] == "astronaut" and audit["matches"][0]["distance"] <= DEFAULT_THRESHOLD
    assert kept is task and audit["units_evaluated"] == 3 and audit["excluded"] is False

    out, audit = audit_and_exclude(task, pipeline_out, tmp_path / "urban", exclude=True)
    assert [p.name for p in out.images] == ["1.jpg", "2.jpg"] and out.captions == [["a scene number 1"], ["a scene number 2"]]
    assert audit["units_before"] == 3 and audit["units_evaluated"] == 2 and audit["excluded"] is True

    _, strict = audit_and_exclude(task, pipeline_out, tmp_path / "urban", threshold=0)  # exact hashes only
    assert strict["count"] <= 1 and strict["threshold"] == 0


def test_exclusion_drops_the_task_own_unit(tmp_path):
    """Winoground: an example goes when either of its images overlaps; Ref-SAV: the items of that frame."""
    from test_eval_winoground_refsav import _refsav_folder, _winoground_folder

    _winoground_folder(tmp_path / "wino")
    wino = read_task("winoground", tmp_path / "wino")
    hit = str(wino.examples[2][1][1])
    out = exclude_images(wino, {hit})
    assert [ex[0] for ex in out.examples] == ["0", "1", "3"] and len(task_images(wino)) == 8

    _refsav_folder(tmp_path / "sav")
    sav = read_task("refsav", tmp_path / "sav")
    out = exclude_images(sav, {str(sav.items[0][0])})
    assert out.ids == ["sav_002_obj1"] and len(out.items) == 1 and len(task_images(sav)) == 2


def _saved_run(tmp_path, cfg):
    from safetensors.torch import save_file

    from annotate.pixclip.build import build_pixclip
    from annotate.train.synthetic import TEXT_DIM

    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "step_0000001"
    ckpt.mkdir(parents=True)
    save_file(build_pixclip(cfg, TEXT_DIM).state_dict(), ckpt / "model.safetensors")
    (run / "checkpoints" / "latest").write_text(ckpt.name)
    (run / "run.json").write_text(json.dumps({"config": cfg.model_dump(mode="json"), "text_dim": TEXT_DIM, "synthetic": True}))
    return run


def test_eval_command_audits_and_excludes(tmp_path, pipeline_out, tiny_train_cfg):
    """`annotate eval --task urban1k --audit-overlap OUT` without a checkpoint reports the audit alone; with
    one and --exclude-overlap it evaluates the two images left and records the audit in its JSON."""
    from typer.testing import CliRunner

    from annotate.cli import app

    _urban(tmp_path / "urban")
    base = ["eval", "--task", "urban1k", "--bench-dir", str(tmp_path / "urban"), "--audit-overlap", str(pipeline_out)]
    res = CliRunner().invoke(app, base + ["--output", str(tmp_path / "audit.json")])
    assert res.exit_code == 0, res.output
    audit = json.loads(res.stdout[res.stdout.index("{"):])
    assert audit["count"] == 1 and audit["ids"] == ["image/0.png"]
    assert json.loads((tmp_path / "audit.json").read_text())["ids"] == ["image/0.png"]

    run = _saved_run(tmp_path, tiny_train_cfg)
    res = CliRunner().invoke(app, base + ["--checkpoint", str(run), "--exclude-overlap"])
    assert res.exit_code == 0, res.output
    out = json.loads((run / "eval-urban1k.json").read_text())
    assert out["images"] == 2 and out["overlap"]["count"] == 1 and out["overlap"]["excluded"] is True
    assert out["overlap"]["ids"] == ["image/0.png"] and 0 <= out["i2t_r1"] <= 1

    res = CliRunner().invoke(app, ["eval", "--checkpoint", str(run), "--task", "urban1k", "--bench-dir",
                                   str(tmp_path / "urban"), "--exclude-overlap"])
    assert res.exit_code != 0 and "--audit-overlap" in res.output
