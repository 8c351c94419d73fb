"""rclip 3.3.0 as a whole-process reference, run offline on the same stand-in weights as cliplens.

rclip 3.x runs CLIP in ONNX Runtime. It loads (rclip/model_download.py) ``$RCLIP_DATADIR/<MODEL_SUBDIR>/visual.onnx``
and ``textual.onnx`` and the BPE vocabulary ``$RCLIP_DATADIR/tokenizer/bpe_simple_vocab_16e6.txt.gz``, and only
asks the hub (``yurijmikhalevich/rclip-models``) for the files that are missing, so with all three in place it
never touches the network. Both graphs take one input named ``input`` (images: float32 ``[N, 3, 256, 256]``;
text: int64 ``[N, 77]``) and rclip reads their single output (``[N, D]``) and L2-normalises it itself. Its
database is ``$RCLIP_DATADIR/db.sqlite3`` (table ``images``: ``filepath``, ``vector`` = float32 bytes).

rclip's own preprocessing (rclip/utils/preprocess.py) is fixed at 256 px for its real model (ViT-B-32-256):
shortest side to 256 with PIL bicubic, centre crop 256, /255, CLIP mean/std. The stand-in is the 224 px
ViT-B-32-quickgelu, so the exported visual graph starts with a fixed 256 -> 224 resize: PIL's own bicubic
kernel (antialiased) written as two constant matrix products, then the unchanged open_clip tower. open_clip
instead resizes the original photo to 224 directly; the difference is one extra resampling (and uint8 rounding
at 256 px), which ``--check`` measures. The resize costs two 224 x 256 matrix products per channel, nothing
next to the ViT, so rclip does the same model work per image as cliplens.

API (``bench/process.py`` runs ``argv`` with ``env``; rclip searches the folder it is started in, so every argv
starts with ``sh -c 'cd "$0" && exec "$@"' FOLDER``, which needs no ``cwd`` argument):

- ``export(standin_or_hf_home, out_dir) -> Path``: the folder holding rclip's model files, cached by weights.
- ``rclip_env(workdir, models) -> dict``: environment for offline runs (own data dir and database under workdir).
- ``index_argv(folder, query)``: rclip indexes the folder then answers the query (it has no index-only mode);
  run again on an unchanged folder it is rclip's "nothing to do" run (a walk and a stat per file).
- ``query_argv(folder, query)``: ``rclip -n -t 10 QUERY``: no indexing, top 10.

``python -m bench.rclip_ref --check --workdir DIR`` runs it all on a few photos and compares with open_clip.
rclip itself is found by ``--rclip``, ``$CLIPLENS_RCLIP`` or ``PATH``; install it in its own venv:
``python3 -m venv /work/rclip-venv && /work/rclip-venv/bin/pip install rclip==3.3.0``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

# What rclip 3.3.0 loads (rclip/model_download.py, rclip/utils/preprocess.py, rclip/utils/tokenizer.py)
RCLIP_VERSION = "3.3.0"
MODEL_SUBDIR = "ViT-B-32-256-datacomp_s34b_b86k"
VISUAL_ONNX = "visual.onnx"
TEXTUAL_ONNX = "textual.onnx"
TOKENIZER_VOCAB = "tokenizer/bpe_simple_vocab_16e6.txt.gz"
INPUT_NAME = "input"  # both graphs; rclip runs session.run(None, {"input": ...}) and takes the one output
OUTPUT_NAME = "output"
RCLIP_IMAGE_SIZE = 256
RCLIP_VECTOR_SIZE = 512  # rclip's Model.VECTOR_SIZE: an empty "--subtract" is a zero vector of this size
CONTEXT_LENGTH = 77
TOP_K = 10

ONNX_OPSET = 17  # as cliplens.fast; ONNX Runtime 1.x runs it
EXPORT_FORMAT = 1  # bump when the graphs change, so cached exports are remade
_CD_AND_RUN = 'cd "$0" && exec "$@"'


# ---- the graphs rclip runs --------------------------------------------------------------------------------------

def pil_bicubic_matrix(n_in: int, n_out: int):
    """float32 (n_out, n_in): PIL's bicubic resize of a length-``n_in`` line to ``n_out`` (antialiased, as PIL is).

    Made by resizing an identity image with PIL itself (float mode: no rounding), so it is PIL's kernel exactly;
    the resize is linear and separable, so an image is ``M @ x @ M.T``. Rows sum to 1: normalising before or after
    it is the same.
    """
    import numpy as np
    from PIL import Image

    eye = Image.fromarray(np.eye(n_in, dtype=np.float32))  # row i = the unit line e_i
    return np.ascontiguousarray(np.asarray(eye.resize((n_out, n_in), Image.BICUBIC), dtype=np.float32).T)


def _modules(model):
    """(visual, text) torch modules with rclip's input/output contract around an open_clip model."""
    import torch

    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else int(size)
    # rclip subtracts a zero vector of 512 from every query: a narrower model (the tiny smoke-test stand-in) gets
    # zeros appended, which changes no cosine.
    pad = max(0, RCLIP_VECTOR_SIZE - int(model.text_projection.shape[1]))

    def widen(features):
        return torch.nn.functional.pad(features, (0, pad)) if pad else features

    class Visual(torch.nn.Module):
        """[N, 3, 256, 256] rclip-preprocessed -> PIL-bicubic to the model's size -> image features [N, D]."""

        def __init__(self):
            super().__init__()
            self.model = model
            self.resize = size != RCLIP_IMAGE_SIZE
            if self.resize:
                self.register_buffer("m", torch.from_numpy(pil_bicubic_matrix(RCLIP_IMAGE_SIZE, size)))

        def forward(self, x):
            if self.resize:
                x = torch.matmul(torch.matmul(self.m, x), self.m.t())  # rows, then columns
            return widen(self.model.encode_image(x))

    class Text(torch.nn.Module):
        """[N, 77] int64 tokens (rclip's tokenizer = open_clip's) -> text features [N, D]."""

        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, tokens):
            return widen(self.model.encode_text(tokens))

    return Visual().eval(), Text().eval()


def _export_one(module, example, path: Path) -> None:
    import torch

    # Grad mode on: under no_grad nn.MultiheadAttention takes its fused fast path, which ONNX cannot express.
    with warnings.catch_warnings(), torch.inference_mode(False), torch.enable_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter is deprecated in favour of dynamo (needs onnxscript)
        torch.onnx.export(module, (example,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                          opset_version=ONNX_OPSET, dynamo=False)


def _weights_file(standin) -> Path | None:
    """The cached hub file open_clip loads the stand-in's weights from, if it is one (no download: cache only)."""
    import open_clip
    from huggingface_hub import try_to_load_from_cache

    if standin.model.startswith("hf-hub:"):
        repo = standin.model[len("hf-hub:"):]
    elif standin.pretrained:
        repo = open_clip.get_pretrained_cfg(standin.model, standin.pretrained).get("hf_hub", "").strip("/")
    else:
        return None
    for name in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
        found = try_to_load_from_cache(repo, name) if repo else None
        if isinstance(found, str):
            return Path(found)
    return None


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def _state_sha256(model) -> str:
    """The weights' identity when they are no single hub file: sha256 over every tensor's name, dtype, shape, bytes."""
    import torch

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return "state:" + h.hexdigest()


def _as_standin(standin_or_hf_home):
    """A StandIn (or anything with ``model`` and ``pretrained``) as is; a path: the b32 stand-in prepared there."""
    if hasattr(standin_or_hf_home, "model") and hasattr(standin_or_hf_home, "pretrained"):
        return standin_or_hf_home
    from bench import standin as sd

    return sd.prepare(Path(standin_or_hf_home), "b32")


def export(standin_or_hf_home, out_dir: Path) -> Path:
    """rclip's model files for a stand-in, in ``out_dir/<key>/`` (the layout of ``$RCLIP_DATADIR``); returns it.

    ``standin_or_hf_home``: a ``bench.standin.StandIn`` already prepared (``HF_HOME`` set), or a hub-cache folder
    where the b32 stand-in is written/used via ``bench.standin.prepare``. The key is a hash of the weights (their hub
    file's sha256, else the loaded tensors'), the export format and torch's version, so a second call with the same
    weights only hashes them.
    Written to a temporary folder and renamed, so a half-written export is never used.
    """
    import open_clip
    import torch

    standin = _as_standin(standin_or_hf_home)
    model = None
    file = _weights_file(standin)
    if file is not None:  # hashing the file (about a second for ViT-B/32) spares loading the model on a cache hit
        weights = "file:" + _file_sha256(file)
    else:
        model, _, _ = open_clip.create_model_and_transforms(standin.model, pretrained=standin.pretrained)
        weights = _state_sha256(model)
    key_text = "|".join((str(EXPORT_FORMAT), standin.model, str(standin.pretrained), weights, torch.__version__,
                         str(ONNX_OPSET), MODEL_SUBDIR))
    key = hashlib.sha256(key_text.encode()).hexdigest()[:20]
    out_dir = Path(out_dir)
    final = out_dir / f"rclip-{key}"
    if (final / "export.json").is_file():
        return final
    if model is None:
        model, _, _ = open_clip.create_model_and_transforms(standin.model, pretrained=standin.pretrained)
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".rclip-export-", dir=out_dir))
    tmp.chmod(0o755)  # mkdtemp makes it private; the export is no secret
    try:
        (tmp / MODEL_SUBDIR).mkdir()
        visual, text = _modules(model)
        _export_one(visual, torch.zeros(2, 3, RCLIP_IMAGE_SIZE, RCLIP_IMAGE_SIZE), tmp / MODEL_SUBDIR / VISUAL_ONNX)
        tokens = open_clip.get_tokenizer(standin.model)(["a photo of a tractor", "x"]).to(torch.int64)
        _export_one(text, tokens, tmp / MODEL_SUBDIR / TEXTUAL_ONNX)
        vocab = tmp / TOKENIZER_VOCAB
        vocab.parent.mkdir()
        shutil.copyfile(open_clip.tokenizer.default_bpe(), vocab)  # the vocabulary rclip downloads is this one
        size = model.visual.image_size
        meta = {"rclip": RCLIP_VERSION, "model": standin.model, "pretrained": standin.pretrained,
                "weights_sha256": weights, "torch": torch.__version__, "opset": ONNX_OPSET,
                "format": EXPORT_FORMAT, "input": INPUT_NAME, "output": OUTPUT_NAME,
                "rclip_image_size": RCLIP_IMAGE_SIZE, "model_image_size": list(size) if isinstance(size, tuple) else size,
                "embed_dim": int(model.text_projection.shape[1]),
                "output_dim": max(RCLIP_VECTOR_SIZE, int(model.text_projection.shape[1]))}
        (tmp / "export.json").write_text(json.dumps(meta, indent=2))
        try:
            tmp.rename(final)
        except OSError:  # another run finished the same export first
            if not (final / "export.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


# ---- running rclip ------------------------------------------------------------------------------------------------

def find_rclip(rclip: str | Path | None = None) -> str:
    """The rclip executable: ``rclip``, else ``$CLIPLENS_RCLIP``, else ``rclip`` on PATH."""
    found = rclip or os.environ.get("CLIPLENS_RCLIP") or shutil.which("rclip")
    if not found or not Path(found).is_file():
        raise FileNotFoundError(f"rclip not found ({found or 'not on PATH'}); install it with "
                                f"`python3 -m venv VENV && VENV/bin/pip install rclip=={RCLIP_VERSION}` and pass "
                                "--rclip VENV/bin/rclip or set CLIPLENS_RCLIP")
    return str(Path(found).absolute())


def rclip_python(rclip: str | Path | None = None) -> str:
    """The interpreter of the rclip script (its shebang), for running rclip's own modules."""
    script = Path(find_rclip(rclip))
    first = script.read_bytes().split(b"\n", 1)[0].decode(errors="replace")
    if first.startswith("#!") and Path(first[2:].strip().split()[0]).is_file():
        return first[2:].strip().split()[0]
    return str(script.parent / "python")


def rclip_env(workdir: Path, models: Path, *, base: dict | None = None) -> dict:
    """Environment for offline rclip runs: ``RCLIP_DATADIR=workdir/rclip-data`` (its database, and links to the
    exported ``models``), an empty hub cache ``workdir/rclip-hf`` with ``HF_HUB_OFFLINE=1`` (a missing file fails
    instead of downloading), and no PYTHONPATH (rclip runs in its own venv).
    """
    workdir = Path(workdir).absolute()
    models = Path(models).absolute()
    data = workdir / "rclip-data"
    data.mkdir(parents=True, exist_ok=True)
    for name in (MODEL_SUBDIR, TOKENIZER_VOCAB.split("/")[0]):
        link = data / name
        if link.is_symlink() and link.resolve() != (models / name).resolve():
            link.unlink()
        if not link.exists():
            link.symlink_to(models / name, target_is_directory=True)
    hf = workdir / "rclip-hf"
    hf.mkdir(exist_ok=True)
    env = dict(os.environ if base is None else base)
    for name in ("PYTHONPATH", "PYTHONHOME"):
        env.pop(name, None)
    env.update({"RCLIP_DATADIR": str(data), "RCLIP_MODEL_CACHE_DIR": str(hf), "HF_HOME": str(hf),
                "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"})
    return env


def database(env: dict) -> Path:
    return Path(env["RCLIP_DATADIR"]) / "db.sqlite3"


def _in(folder: Path, argv: list[str]) -> list[str]:
    return ["sh", "-c", _CD_AND_RUN, str(Path(folder).absolute()), *argv]


def index_argv(folder: Path, query: str = "tractor", *, top: int = TOP_K, rclip: str | None = None) -> list[str]:
    """``cd FOLDER && rclip -t 10 QUERY``: indexes new/changed photos (all of them the first time, nothing on an
    unchanged folder), then answers the query; rclip has no index-only mode, so the query is part of the run."""
    return _in(folder, [find_rclip(rclip), "-t", str(top), query])


def query_argv(folder: Path, query: str = "tractor", *, top: int = TOP_K, rclip: str | None = None) -> list[str]:
    """``cd FOLDER && rclip -n -t 10 QUERY``: a one-shot query of the existing index, no indexing."""
    return _in(folder, [find_rclip(rclip), "-n", "-t", str(top), query])


def read_vectors(env: dict) -> dict:
    """filepath -> float32 vector, as rclip stored them (live rows only)."""
    import sqlite3

    import numpy as np

    con = sqlite3.connect(database(env))
    try:
        rows = con.execute("SELECT filepath, vector FROM images WHERE deleted IS NULL").fetchall()
    finally:
        con.close()
    return {path: np.frombuffer(vec, dtype=np.float32) for path, vec in rows}


def parse_results(stdout: str) -> list[tuple[float, str]]:
    """rclip's default output (``score<TAB>"path"`` lines after a header) as (score, path)."""
    out = []
    for line in stdout.splitlines()[1:]:
        score, _, path = line.partition("\t")
        out.append((float(score), path.strip('"')))
    return out


# ---- the check ----------------------------------------------------------------------------------------------------

_RCLIP_SIDE = r'''
import sys, numpy as np
from rclip.utils import helpers
from rclip.utils.preprocess import preprocess
from rclip.model import Model
out, query, paths = sys.argv[1], sys.argv[2], sys.argv[3:]
pre = np.stack([preprocess(helpers.read_image(p)) for p in paths])
m = Model()
m.ensure_downloaded()
np.savez(out, pre=pre, text=m.compute_text_features([query]), tokens=m._tokenizer([query]))
'''


def _run(argv: list[str], env: dict) -> tuple[float, str]:
    import shlex
    import subprocess
    import time

    t0 = time.perf_counter()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(argv)[:300]} failed ({proc.returncode}): {proc.stderr.strip()[-800:]}")
    return wall, proc.stdout


def check(workdir: Path, *, which: str = "b32", photos: int = 20, rclip: str | None = None,
          query: str = "tractor") -> dict:
    """Export, index ``photos`` photos with rclip offline, query it, and compare with open_clip on the same files."""
    import numpy as np

    from bench import standin as sd

    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    standin = sd.prepare(workdir / "hf", which)  # before open_clip is imported
    import open_clip
    import torch
    from PIL import Image

    from bench.data import smooth_images

    folder = workdir / "photos"
    folder.mkdir(exist_ok=True)
    paths = []
    for i in range(photos):  # landscape and portrait, as bench/process.py writes them
        size = (480, 640) if i % 3 else (640, 480)
        path = folder / f"photo_{i:03d}.jpg"
        Image.fromarray(smooth_images(1, size, seed=100 + i)[0]).save(path, quality=85)
        paths.append(str(path))

    models = export(standin, workdir / "rclip-models")
    env = rclip_env(workdir, models)
    if database(env).exists():
        database(env).unlink()
    t_index, _ = _run(index_argv(folder, query, rclip=rclip), env)
    t_nothing, _ = _run(index_argv(folder, query, rclip=rclip), env)
    t_query, out = _run(query_argv(folder, query, rclip=rclip), env)
    ranked = parse_results(out)
    stored = read_vectors(env)
    got = np.stack([stored[str(Path(p).resolve())] for p in paths])

    side = workdir / "rclip-side.npz"
    _run([rclip_python(rclip), "-c", _RCLIP_SIDE, str(side), query, *paths], env)
    side_data = np.load(side)

    model, _, transform = open_clip.create_model_and_transforms(standin.model, pretrained=standin.pretrained)
    model.eval()
    tokenizer = open_clip.get_tokenizer(standin.model)
    visual, _ = _modules(model)
    with torch.no_grad():
        ours_in = torch.stack([transform(Image.open(p)) for p in paths])
        ref = torch.nn.functional.normalize(model.encode_image(ours_in), dim=-1).numpy()
        torch_same = torch.nn.functional.normalize(visual(torch.from_numpy(side_data["pre"])), dim=-1).numpy()
        tokens = tokenizer([query])
        text_ref = torch.nn.functional.normalize(model.encode_text(tokens), dim=-1).numpy()[0]
        m = torch.from_numpy(pil_bicubic_matrix(RCLIP_IMAGE_SIZE, ours_in.shape[-1]))
        rclip_in = (m @ torch.from_numpy(side_data["pre"]) @ m.t()).numpy()

    d = ref.shape[1]  # rclip's vectors carry zeros after the model's width when it is under 512 (tiny)
    cos = np.einsum("ij,ij->i", got[:, :d].astype(np.float64), ref)
    pix = np.abs(rclip_in - ours_in.numpy())
    top_ref = [paths[i] for i in np.argsort(-(ref @ text_ref))[:TOP_K]]
    top_rclip = [p for _, p in ranked]
    result = {
        "photos": photos, "model": standin.model, "export": str(models),
        "cos_rclip_db_vs_open_clip": {"mean": float(cos.mean()), "min": float(cos.min())},
        "export_max_abs_diff_same_input": float(np.abs(got - torch_same).max()),
        "preprocess_abs_diff_normalised_units": {"mean": float(pix.mean()), "max": float(pix.max())},
        "text_tokens_equal": bool(np.array_equal(side_data["tokens"], tokens.numpy())),
        "text_cos_rclip_vs_open_clip": float(side_data["text"][0, :d].astype(np.float64) @ text_ref),
        "top10_overlap": len(set(top_ref) & set(top_rclip)), "top10_same_order": top_ref == top_rclip,
        "wall_s": {"index": t_index, "reindex_unchanged": t_nothing, "query": t_query},
    }
    (workdir / "rclip-check.json").write_text(json.dumps(result, indent=2))
    return result


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m bench.rclip_ref", description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="export, run rclip offline on a few photos, compare")
    p.add_argument("--workdir", type=Path, required=True, help="where the stand-in, photos, export and rclip data go")
    p.add_argument("--model", choices=("b32", "tiny"), default="b32")
    p.add_argument("--photos", type=int, default=20)
    p.add_argument("--rclip", default=None, help="the rclip executable (default: $CLIPLENS_RCLIP or PATH)")
    args = p.parse_args(argv)
    if not args.check:
        p.error("nothing to do: pass --check")
    try:
        r = check(args.workdir, which=args.model, photos=args.photos, rclip=args.rclip)
    except (FileNotFoundError, RuntimeError) as exc:
        print(f"rclip_ref: {exc}")
        return 1
    c, w = r["cos_rclip_db_vs_open_clip"], r["wall_s"]
    ok = c["min"] >= 0.999 and r["export_max_abs_diff_same_input"] <= 1e-4 and r["text_tokens_equal"]
    print(f"rclip_ref check {'OK' if ok else 'FAILED'}: {r['photos']} photos, image cos rclip vs open_clip "
          f"mean {c['mean']:.5f} min {c['min']:.5f}; export max|diff| on rclip's input "
          f"{r['export_max_abs_diff_same_input']:.1e}; preprocess mean|diff| "
          f"{r['preprocess_abs_diff_normalised_units']['mean']:.4f} (max {r['preprocess_abs_diff_normalised_units']['max']:.3f}); "
          f"text cos {r['text_cos_rclip_vs_open_clip']:.6f} tokens {'equal' if r['text_tokens_equal'] else 'DIFFER'}; "
          f"top10 overlap {r['top10_overlap']}/{min(TOP_K, r['photos'])}{' same order' * r['top10_same_order']}; wall index {w['index']:.1f}s, unchanged {w['reindex_unchanged']:.1f}s, "
          f"query {w['query']:.1f}s")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
