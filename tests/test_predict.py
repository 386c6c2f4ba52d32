"""`python -m finetune.predict`: over a folder of real images it agrees, image by image, with the exported
model in timm behind timm's own transform; an unreadable file is one line, the rest still predicted."""

import json
import subprocess
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import real_images
from finetune.predict import main
from launching import CPU_ENV, ROOT, launch_command
from vitcore.report.export import main as export

timm = pytest.importorskip("timm")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """12 real images in class subfolders, a broken and a truncated JPEG beside them, and a text file to
    pass over."""
    root = real_images(tmp_path_factory.mktemp("photos"), 12)
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    first = sorted(root.rglob("*.*"))[0]
    (root / "truncated.jpg").write_bytes(first.read_bytes()[:300])
    (root / "notes.txt").write_text("not an image")
    return root


def run(capsys, *args: str) -> list[str]:
    main(list(args))
    return capsys.readouterr().out.splitlines()


@pytest.mark.parametrize("size", [None, ("32", "48")], ids=["stored-32", "32x48"])
def test_predictions_agree_with_timm_image_by_image(classifier, folder, tmp_path, capsys, size):
    size_args = ["--image-size", *size] if size else []
    lines = run(capsys, "--checkpoint", str(classifier), str(folder), "--json", "--top-k", "3",
                "--batch-size", "5", "--num-workers", "0", *size_args)
    rows = [json.loads(line) for line in lines]
    images = [str(p) for p in sorted(folder.rglob("*")) if p.suffix in (".jpg", ".png")]
    assert [r["image"] for r in rows] == images  # every image once, in sorted order; notes.txt passed over
    broken = [r for r in rows if "error" in r]
    assert [r["image"] for r in broken] == [str(folder / "broken.jpg"), str(folder / "truncated.jpg")]
    assert all(r["error"] for r in broken) and len(rows) == 14

    export(["--checkpoint", str(classifier), "--out", str(tmp_path / "export"), *size_args])
    model = timm.create_model(f"local-dir:{tmp_path / 'export'}", pretrained=True).eval()
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    names = model.pretrained_cfg["label_names"]
    for row in rows:
        if "error" in row:
            continue
        with torch.no_grad():
            probs = model(transform(Image.open(row["image"]).convert("RGB"))[None]).softmax(-1)[0]  # (classes,)
        top = probs.topk(3)
        assert [t["index"] for t in row["top_k"]] == top.indices.tolist(), row["image"]
        assert [t["class"] for t in row["top_k"]] == [names[i] for i in top.indices.tolist()]
        torch.testing.assert_close(torch.tensor([t["prob"] for t in row["top_k"]]), top.values,
                                   atol=1e-5, rtol=0)
    assert max(t["prob"] for r in rows if "top_k" in r for t in r["top_k"]) > 0.2  # not uniform guesses


def test_plain_lines_and_a_missing_file(classifier, folder, capsys):
    one = sorted(folder.rglob("*.jpg"))[0]
    lines = run(capsys, "--checkpoint", str(classifier), str(one), str(folder / "missing.jpg"), "--top-k", "2",
                "--num-workers", "0")
    assert len(lines) == 2
    path, first, second = lines[0].split("\t")
    assert path == str(one) and first.rsplit(" ", 1)[1].startswith("0.") and second.count(" ") >= 1
    assert lines[1].startswith(f"{folder / 'missing.jpg'}\terror: FileNotFoundError")


def test_an_encoder_without_a_head_is_refused(pretrained, folder):
    with pytest.raises(SystemExit, match="is a pretrain checkpoint, not a fine-tuned classifier"):
        main(["--checkpoint", str(pretrained), str(folder)])


@pytest.mark.slow  # a 2-process accelerate launch: ~15 s on an idle 2-core CPU
def test_two_processes_print_the_same_lines_once_in_order(classifier, folder, capsys):
    args = ["--checkpoint", str(classifier), str(folder), "--json", "--batch-size", "2", "--num-workers", "0"]
    want = run(capsys, *args)
    cmd = launch_command(ROOT / "finetune" / "predict.py", *args)
    result = subprocess.run(cmd, cwd=ROOT, env=CPU_ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    got = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert [json.loads(line)["image"] for line in got] == [json.loads(line)["image"] for line in want]
    for a, b in zip(got, want):
        a, b = json.loads(a), json.loads(b)
        assert ("error" in a) == ("error" in b)
        if "top_k" in a:
            assert [t["index"] for t in a["top_k"]] == [t["index"] for t in b["top_k"]]
            torch.testing.assert_close(torch.tensor([t["prob"] for t in a["top_k"]]),
                                       torch.tensor([t["prob"] for t in b["top_k"]]), atol=1e-5, rtol=0)
