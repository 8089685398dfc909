"""vllm-memoir: serve MEMOIR-edited models with vLLM, routing each request to its edit.

`vllm_memoir.core` is the pure-torch math and artifact format; the other modules are the
vLLM plugin (registered through the `vllm.general_plugins` entry point) and import vLLM.
"""
