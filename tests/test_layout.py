"""Importing a library module changes nothing outside it; argument parsing lives only in dreamlip.cli."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "dreamlip"


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


def test_importing_the_model_leaves_torch_and_open_clip_alone():
    done = _python(
        "import sys, torch\n"
        "import dreamlip.model, dreamlip.eval, dreamlip.export, dreamlip.train\n"
        # the compat shim defines torchvision::nms when it patches the registry
        "try:\n"
        "    torch._C._dispatch_find_schema_or_throw('torchvision::nms', '')\n"
        "    patched = True\n"
        "except RuntimeError:\n"
        "    patched = False\n"
        "print(patched, 'open_clip' in sys.modules)\n"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "False"]


def test_a_loader_transform_unpickles_in_a_fresh_process():
    """What a spawned DataLoader worker does first: a bare interpreter unpickles the transform."""
    import pickle

    from PIL import Image

    from dreamlip._compat import PortableTransform
    from dreamlip.model import create_model

    transform = create_model("DreamLIP-ViT-Nano-32")[2]
    image = Image.new("RGB", (40, 30), (200, 10, 10))
    done = subprocess.run(
        [sys.executable, "-c", "import pickle, sys\nfrom PIL import Image\n"
         "t = pickle.loads(sys.stdin.buffer.read())\nprint(t(Image.new('RGB', (40, 30), (200, 10, 10))).sum().item())"],
        input=pickle.dumps(PortableTransform(transform)), capture_output=True,
    )
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert float(done.stdout) == pytest.approx(transform(image).sum().item())


def test_the_factory_registers_the_model_configs_once():
    done = _python(
        "from dreamlip.model import create_model, load_open_clip\n"
        "model, _, _ = create_model('DreamLIP-ViT-Nano-32')\n"
        "open_clip = load_open_clip()\n"
        "from open_clip.factory import _MODEL_CONFIG_PATHS\n"
        "ours = [p for p in _MODEL_CONFIG_PATHS if p.parent.name == 'dreamlip']\n"
        "print(len(ours), 'DreamLIP-ViT-Tiny-64' in open_clip.list_models(), model.clip.visual.output_dim)\n"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1", "True", "64"]


def test_importing_the_report_keeps_the_callers_matplotlib_backend():
    done = _python(
        "import matplotlib\n"
        "matplotlib.use('svg')\n"
        "import dreamlip.report, dreamlip.demo\n"
        "print(matplotlib.get_backend())\n"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "svg"


def test_the_demo_command_draws_with_agg(monkeypatch, tmp_path):
    import matplotlib

    from dreamlip.cli import main
    from dreamlip.cli import demo as demo_cli

    matplotlib.use("svg")
    seen = []
    monkeypatch.setattr(demo_cli, "run_demo", lambda out, settings: seen.append(matplotlib.get_backend().lower()))
    assert main(["demo", "--out", str(tmp_path)]) == 0
    assert seen == ["agg"]


def test_only_the_cli_package_parses_arguments():
    parsers = [
        str(path.relative_to(SRC))
        for path in SRC.rglob("*.py")
        if "cli" not in path.relative_to(SRC).parts
        and any(
            isinstance(node, (ast.Import, ast.ImportFrom))
            and "argparse" in ([a.name for a in node.names] if isinstance(node, ast.Import) else [node.module])
            for node in ast.walk(ast.parse(path.read_text()))
        )
    ]
    assert parsers == []


# Lowest first: a module imports only from its own layer or those below (imports needed only for
# type checking aside). Dataset layouts live in `formats`, under every command that reads them.
LAYERS = (
    ("_compat", "captions", "io", "launch"),
    ("formats",),
    ("checkpoint", "data", "losses", "model", "realset", "synthetic", "views"),
    ("eval", "objectives", "recaption"),
    ("config", "convert", "export", "prepare"),
    ("distributed", "divergence", "loading", "report", "results", "serve"),
    ("train",),
    ("demo",),
    ("cli",),
)


def _dreamlip_imports(path: Path) -> set[str]:
    """The dreamlip top-level modules/packages ``path`` imports at run time."""
    tree = ast.parse(path.read_text())
    typing_only = {
        id(node) for block in ast.walk(tree)
        if isinstance(block, ast.If) and ast.unparse(block.test) == "TYPE_CHECKING"
        for child in block.body for node in ast.walk(child)
    }
    package = path.relative_to(SRC.parent).with_suffix("").parts[:-1]  # e.g. ("dreamlip", "data")
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom):
            base = list(package[: len(package) - node.level + 1]) if node.level else []
            names = [".".join([*base, node.module] if node.module else base)]
            if node.module is None or names[0] == "dreamlip":  # `from . import x`, `from dreamlip import x`
                names = [f"{names[0]}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found |= {name.split(".")[1] for name in names if name.startswith("dreamlip.")}
    return found


def test_no_module_imports_from_a_layer_above_it():
    layer_of = {name: rank for rank, layer in enumerate(LAYERS) for name in layer}
    modules = {path: path.relative_to(SRC).with_suffix("").parts[0] for path in SRC.rglob("*.py")}
    unplaced = sorted({top for top in modules.values() if top not in layer_of and top != "__init__"})
    assert unplaced == [], "add new top-level modules to LAYERS"
    upward = sorted(
        f"{path.relative_to(SRC)} imports dreamlip.{imported}"
        for path, top in modules.items() if top != "__init__"
        for imported in _dreamlip_imports(path)
        if imported in layer_of and layer_of[imported] > layer_of[top]
    )
    assert upward == []
