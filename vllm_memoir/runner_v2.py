"""Adapter for vLLM's Model Runner V2 (the GPU default in vLLM 0.32).

Not run on a GPU yet (V2 needs Triton; this project's CI is CPU-only); its calls are unit
tested against the installed vLLM's interface (vllm/v1/worker/gpu/model_states/interface.py).
V2 keeps each request in a state slot (`req_index`) and maps batch rows to slots every step
(`input_batch.idx_mapping`), which is exactly RequestRoutes' slot + row-mapping model. The
model class returns this from get_model_state_cls(), which only V2 consults.
"""

from __future__ import annotations

from vllm.v1.worker.gpu.model_states.default import DefaultModelState

from vllm_memoir.routing import requests as request_routes


class MemoirModelState(DefaultModelState):
    def __init__(self, vllm_config, model, encoder_cache, device):
        super().__init__(vllm_config, model, encoder_cache, device)
        self.routes = request_routes.attach(self, self.max_num_reqs, self.device)
        self._slot_of: dict[str, int] = {}

    def add_request(self, req_index, new_req_data) -> None:
        super().add_request(req_index, new_req_data)
        self._slot_of[new_req_data.req_id] = req_index
        # A preempted request comes back as a new one whose prefill includes its outputs.
        resumed = len(new_req_data.prefill_token_ids or ()) > len(new_req_data.prompt_token_ids or ())
        self.routes.add(req_index, new_req_data.prompt_token_ids, is_new_request=not resumed)

    def remove_request(self, req_id: str) -> None:
        super().remove_request(req_id)
        slot = self._slot_of.pop(req_id, None)
        if slot is not None:
            self.routes.remove(slot)

    def prepare_inputs(self, input_batch, req_states):
        num_rows = input_batch.num_reqs
        self.routes.set_batch(num_rows, input_batch.idx_mapping_np[:num_rows].tolist())
        return super().prepare_inputs(input_batch, req_states)

    def prepare_dummy_inputs(self, num_reqs: int, num_tokens: int):
        # Dummy runs (CUDA graph capture, idle data-parallel ranks) carry no requests: the
        # routing op must not apply the last real batch's routes to them.
        self.routes.set_batch(0)
        return super().prepare_dummy_inputs(num_reqs, num_tokens)
