"""What the routing op may do on the device its tensors live on.

On a GPU the op only queues work: reading a value back would wait for the device (and break
a CUDA-graph capture or a torch.compile graph). On the CPU the values are already there, so
where a look at them lets the op skip work, it may take it.
"""

from __future__ import annotations

import torch


def reads_are_free(x: torch.Tensor) -> bool:
    """Whether looking at tensor values waits on nothing: the CPU, outside torch.compile."""
    return x.device.type == "cpu" and not torch.compiler.is_compiling()


def capturing(x: torch.Tensor) -> bool:
    """Whether a CUDA graph is being captured (its replays will not run the host's code)."""
    return x.is_cuda and torch.cuda.is_current_stream_capturing()
