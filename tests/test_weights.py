"""Weights by name or URL: download once into the cache, the hash check of torchvision-style names, a
partial download never cached, the unreachable-URL line, torchvision names converted once, ``ssd weights
list``, and under torch.distributed one download per machine. No test touches the network: URLs are
``file://`` paths and a local HTTP server."""

from __future__ import annotations

import hashlib
import http.server
import logging
import socket
import textwrap
import threading
from pathlib import Path

import pytest
import torch
from conftest import launch_ranks

from ssd.checkpoint import load_checkpoint
from ssd.cli import main
from ssd.download import DownloadError, expected_hash, weights_cache
from ssd.weights import PUBLISHED, raw_weights, resolve_weights


def tiny_state_file(folder: Path, name: str = "tiny") -> tuple[Path, str]:
    """A small state dict saved as ``<name>-<its SHA-256's first 8 hex digits>.pth``; and that prefix."""
    folder.mkdir(parents=True, exist_ok=True)
    plain = folder / f"{name}.pth"
    torch.save({"features.0.weight": torch.arange(24.0).reshape(2, 3, 2, 2)}, plain)
    digest = hashlib.sha256(plain.read_bytes()).hexdigest()[:8]
    named = plain.rename(folder / f"{name}-{digest}.pth")
    return named, digest


def downloads() -> list[str]:
    folder = weights_cache() / "downloads"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def test_torchvision_style_names_promise_a_hash_prefix():
    assert expected_hash("vgg16-397923af.pth") == "397923af"
    assert expected_hash("ssd300_vgg16_coco-b556d3b4.pth") == "b556d3b4"
    assert expected_hash("last.pt") is None and expected_hash("run-1234567.pth") is None  # 7 digits: no promise
    assert expected_hash("model-ABCDEF12.pth") is None  # torchvision writes lower case


def test_a_file_url_is_fetched_once_and_then_read_offline(tmp_path, caplog):
    source, _ = tiny_state_file(tmp_path / "server")
    url = source.as_uri()
    with caplog.at_level(logging.INFO, logger="ssd.weights"):
        first = Path(raw_weights(url))
    assert first == weights_cache() / "downloads" / source.name and first.read_bytes() == source.read_bytes()
    assert caplog.text.count("downloading") == 1
    source.unlink()  # the second use needs no source
    assert Path(resolve_weights(url)) == first and caplog.text.count("downloading") == 1
    assert downloads() == [source.name]


def test_a_wrong_hash_is_one_line_and_nothing_is_cached(tmp_path, capsys):
    source, digest = tiny_state_file(tmp_path / "server")
    wrong = source.rename(source.with_name("tiny-00000000.pth"))
    with pytest.raises(DownloadError) as e:
        raw_weights(wrong.as_uri())
    assert str(e.value) == (
        f"{wrong.as_uri()}: SHA-256 starts with {digest}, but the file name promises 00000000 "
        "(a corrupt or different file); nothing was cached"
    )
    assert downloads() == []  # no partial file either
    # a local path named like torchvision's is checked too, before anything reads it
    assert main(["convert", "--from", "vgg16", str(wrong), "--out", str(tmp_path / "x.pt")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"ssd convert: error: {wrong}: SHA-256 starts with {digest}") and "\n" not in err
    assert resolve_weights(source.with_name("other.pth")) == str(source.with_name("other.pth"))  # no promise


class Truncating(http.server.BaseHTTPRequestHandler):
    """Announces 4 MiB, sends 1 MiB, hangs up."""

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(4 << 20))
        self.end_headers()
        self.wfile.write(b"\0" * (1 << 20))
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, *args):
        pass


def test_a_partial_download_is_never_cached(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Truncating)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/big.pth"
    try:
        with pytest.raises(DownloadError) as e:
            raw_weights(url)
    finally:
        server.shutdown()
    assert str(e.value) == f"{url}: the download ended after 1048576 of 4194304 bytes; nothing was cached"
    assert downloads() == []  # neither big.pth nor its .part


def test_an_unreachable_url_names_the_url_the_cache_and_the_manual_route(tmp_path, capsys):
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/vgg16-397923af.pth"
    assert main(["convert", "--from", "vgg16", url, "--out", str(tmp_path / "x.pt")]) == 2
    err = capsys.readouterr().err.strip()
    cache = weights_cache() / "downloads" / "vgg16-397923af.pth"
    assert err.startswith(f"ssd convert: error: cannot download {url} (")
    assert err.endswith(f"; download it elsewhere and pass the local file ({cache} is the cache)")
    assert "\n" not in err and downloads() == []


def test_a_url_to_a_foreign_file_for_weights_suggests_convert(tmp_path):
    source, _ = tiny_state_file(tmp_path / "server")
    from ssd.checkpoint import CheckpointError
    from ssd.inference import Detector

    with pytest.raises(CheckpointError, match="not an ssd checkpoint .*ssd convert --from"):
        Detector.from_checkpoint(source.as_uri(), device="cpu")


@pytest.fixture
def planted_torchvision_file(tv_ssd300) -> Path:
    """torchvision's SSD300 file as if downloaded before (a 21-class random model under the published
    name): a cached download is not fetched again, so this is what the name converts from."""
    url = PUBLISHED["ssd300_vgg16_coco"].url
    path = weights_cache() / "downloads" / url.rsplit("/", 1)[1]
    path.parent.mkdir(parents=True)
    torch.save(tv_ssd300.state_dict(), path)
    return path


def test_a_torchvision_name_is_converted_once_and_reused(planted_torchvision_file, caplog, capsys):
    with caplog.at_level(logging.INFO, logger="ssd.weights"):
        path = Path(resolve_weights("torchvision:ssd300_vgg16_coco"))
        again = Path(resolve_weights("torchvision:ssd300_vgg16_coco"))
    assert path == again == weights_cache() / "ssd300_vgg16_coco-b556d3b4.ssd.pt"
    assert caplog.text.count("converted torchvision:ssd300_vgg16_coco") == 1 and "downloading" not in caplog.text
    ckpt = load_checkpoint(path)
    assert ckpt["source"] == "torchvision" and ckpt["config"]["model"]["num_classes"] == 21
    assert main(["weights", "list"]) == 0
    out = capsys.readouterr().out
    assert f"    cached: {path}\n" in out and out.count("not cached: downloaded and converted on first use") == 2
    assert "terms: see https://github.com/pytorch/vision" in out
    with pytest.raises(ValueError, match=r"unknown weights name 'torchvision:vgg19'; valid: torchvision:ssd300"):
        resolve_weights("torchvision:vgg19")


RANK_SCRIPT = textwrap.dedent(
    """
    import logging, sys
    import torch.distributed as dist
    from ssd.weights import resolve_weights
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    dist.init_process_group("gloo")
    print("PATH", resolve_weights(sys.argv[1]), flush=True)
    dist.destroy_process_group()
    """
)


def test_under_torch_distributed_the_first_process_downloads_and_the_other_waits(tmp_path):
    source, _ = tiny_state_file(tmp_path / "server")
    (tmp_path / "rank.py").write_text(RANK_SCRIPT)
    results = launch_ranks(2, ["rank.py", source.as_uri()], tmp_path)
    assert [r.returncode for r in results] == [0, 0], [r.stdout for r in results]
    cached = tmp_path / "cache" / "weights" / "downloads" / source.name
    assert [r.stdout.count("downloading") for r in results] == [1, 0]
    assert all(f"PATH {cached}\n" in r.stdout for r in results)


def test_a_url_to_an_ssd_checkpoint_serves_weights_and_model_init(tmp_path, make_tiny_config):
    from ssd.checkpoint import make_checkpoint, save_checkpoint
    from ssd.engine.finetune import init_weights_from
    from ssd.inference import Detector
    from ssd.model import build_ssd

    cfg = make_tiny_config(num_classes=3)
    torch.manual_seed(0)
    trained = build_ssd(cfg)
    local = tmp_path / "server" / "tiny_ssd.pt"
    save_checkpoint(make_checkpoint(trained.state_dict(), cfg, ["cat", "dog"], "test"), local)
    image = torch.randint(0, 256, (96, 128, 3), dtype=torch.uint8).numpy()
    from_url = Detector.from_checkpoint(local.as_uri(), device="cpu", score_thresh=0.0)(image)
    from_path = Detector.from_checkpoint(local, device="cpu", score_thresh=0.0)(image)
    assert torch.equal(from_url["boxes"], from_path["boxes"]) and torch.equal(from_url["scores"], from_path["scores"])
    fresh = build_ssd(cfg)
    report = init_weights_from(fresh, local.as_uri(), backbone_only=False)
    assert len(report["loaded"]) == len(trained.state_dict()) and report["reinitialised"] == []
    for key, value in trained.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    assert downloads() == ["tiny_ssd.pt"]
