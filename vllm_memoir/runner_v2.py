"""Adapter for vLLM's Model Runner V2 (the GPU default in vLLM 0.32).

UNTESTED: V2 needs Triton and a GPU; this project's CI is CPU-only. Kept thin on purpose:
V2 keeps each request in a state slot (`req_index`) and maps batch rows to slots every step
(`input_batch.idx_mapping`), which is exactly RequestRoutes' slot + row-mapping model.
The model class returns this from get_model_state_cls(), which only V2 consults.
"""

from __future__ import annotations

from vllm.v1.worker.gpu.model_states.default import DefaultModelState

from vllm_memoir import request_routes


class MemoirModelState(DefaultModelState):
    def __init__(self, vllm_config, model, encoder_cache, device):
        super().__init__(vllm_config, model, encoder_cache, device)
        self.routes = request_routes.attach(self, self.max_num_reqs)
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
