"""The drop-in's client, played: a moshi-finetune paper-metrics config and a stand-in of its in-place TTT layer.

`PAPER_METRICS_YAML` is the `paper_metrics` block (with its neighbours) of a public paper-metrics training config
(AlufRon/claude-web, moshi_ttt_try/moshi-finetune/example/baseline_fixed.yaml), values as they are there, the
paths pointed at test folders by `client_config`. `MOSHI_FINETUNE_EXAMPLE` is moshi-finetune's own example training
config (example/moshi_7B.yaml), which has no paper_metrics block.

`ClientTTTGating` stands in for the client's TTT layer (its shape, written here): it wraps a layer's feed-forward
gating and adds a trainable fast weight `w_down` that, while streaming, is updated in place after every
`chunk_size` frames from inputs it keeps in a plain attribute; its eval `forward` over a whole sequence adapts
nothing; its streaming reset copies the pretrained weight back into `w_down`; it takes one sequence at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import yaml
from moshi.modules.streaming import State, StreamingModule
from torch import nn

PAPER_METRICS_YAML = """
ttt:
  enable: false
  layers: "15,16,31"
  base_lr: 0.1
  mini_batch_size: 16
lora:
  enable: true
  rank: 64
  scaling: 2.
paper_metrics:
  paper_metrics_eval: true
  paper_metrics_freq: 50
  paper_metrics_use_silence: true
  paper_metrics_use_user_stream: false
  sblimp_audio_dir: /sise/eliyanac-group/ron_al/sblimp_data/sLM21_dataset/syntactic/test/
  sblimp_gold_csv: /sise/eliyanac-group/ron_al/sblimp_data/sLM21_dataset/syntactic/test/gold.csv
  sblimp_max_pairs: 10
  sstory_audio_dir: /sise/eliyanac-group/ron_al/sSC/sSC/
  sstory_max_pairs: 10
  swuggy_audio_dir: /sise/eliyanac-group/ron_al/sblimp_data/sLM21_dataset/lexical/test/
  swuggy_gold_csv: /sise/eliyanac-group/ron_al/sblimp_data/sLM21_dataset/lexical/test/gold.csv
  swuggy_max_pairs: 10
  tstory_audio_dir: /sise/eliyanac-group/ron_al/tSC/tSC/
  tstory_max_pairs: 10
  librilight_audio_dir: /sise/eliyanac-group/ron_al/librilight/extracted_medium/medium/
  librilight_evaluation_mode: single_book
  librilight_speaker_id: "100"
  librilight_book_name: "emerald_city_librivox_64kb_mp3"
  librilight_max_chapters: 3
  librilight_num_sequences: 1
  librilight_streaming:
    enabled: true
    memory_check: true
    cache_clear_interval: 3000
    max_sequence_length: 50000
    ttt_verification: true
    memory_log_interval: 1000
    use_fixed_method: true
    verify_loss_computation: true
first_codebook_weight_multiplier: 100.
text_padding_weight: .5
duration_sec: 15
batch_size: 1
max_steps: 1000
gradient_checkpointing: true
optim:
  lr: 1e-6
  weight_decay: 0.1
  pct_start: 0.05
seed: 42
run_dir: /sise/eliyanac-group/ron_al/seamless_baseline_fixed
"""

MOSHI_FINETUNE_EXAMPLE = """
data:
  eval_data: ''
  shuffle: true
  train_data: ''
moshi_paths:
  hf_repo_id: "kyutai/moshiko-pytorch-bf16"
full_finetuning: false
lora:
  enable: true
  rank: 128
  scaling: 2.
  ft_embed: false
first_codebook_weight_multiplier: 100.
text_padding_weight: .5
duration_sec: 100
batch_size: 16
max_steps: 2000
gradient_checkpointing: true
optim:
  lr: 2e-6
  weight_decay: 0.1
  pct_start: 0.05
seed: 0
log_freq: 1
eval_freq: 100
do_eval: false
do_ckpt: true
ckpt_freq: 100
save_adapters: true
run_dir: ""
"""

BOOK = "100/emerald_city_librivox_64kb_mp3"


def client_config(audio_dir: str, **changes: object) -> dict:
    """The client's training config (a dict, as the training loop holds it), its LibriLight path at `audio_dir`,
    with `changes` applied to the paper_metrics block; the other benchmarks' paths stay (they are not read)."""
    config = yaml.safe_load(PAPER_METRICS_YAML)
    config["paper_metrics"]["librilight_audio_dir"] = str(audio_dir)
    config["paper_metrics"].update(changes)
    return config


@dataclass
class _ClientState(State):
    module: nn.Module | None = None

    def reset(self, reset_mask: torch.Tensor) -> None:
        super().reset(reset_mask)
        with torch.no_grad():  # like the client: back to the pretrained weight, not to the trained one
            self.module.w_down.copy_(self.module.w_down_pretrained)
        self.module._inference_z_buffer = None


class ClientTTTGating(StreamingModule[_ClientState]):
    def __init__(self, inner: nn.Module, dim: int, chunk_size: int, lr: float = 0.5, announce: bool = True) -> None:
        super().__init__()
        self.inner, self.every, self.lr = inner, chunk_size, lr
        if announce:  # the client's layer names its period `chunk_size`; `announce=False` hides it
            self.chunk_size = chunk_size
        self.w_down = nn.Parameter(torch.zeros(dim, dim))
        self.register_buffer("w_down_pretrained", torch.zeros(dim, dim))
        self._inference_z_buffer: torch.Tensor | None = None

    def _init_streaming_state(self, batch_size: int) -> _ClientState:
        return _ClientState(batch_size, self.w_down.device, module=self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B, T, D]
        if x.shape[0] != 1:
            raise RuntimeError(f"ClientTTTGating supports one sequence at a time, got a batch of {x.shape[0]}")
        out = self.inner(x) + x @ self.w_down.t()
        if self._streaming_state is not None:  # streaming: buffer, and update every chunk_size frames
            z = x[0].detach().float()
            buffer = z if self._inference_z_buffer is None else torch.cat([self._inference_z_buffer, z])
            while buffer.shape[0] >= self.every:
                chunk, buffer = buffer[: self.every], buffer[self.every :]
                with torch.no_grad():
                    self.w_down.add_(self.lr * (chunk.t() @ chunk) / self.every)
            self._inference_z_buffer = buffer
        return out


def attach_client_ttt(model: nn.Module, layers: list[int], chunk_size: int, trained: bool = False,
                      announce: bool = True) -> list:
    """Wrap the gating of `layers` of `model` in a `ClientTTTGating` (in place); `trained`: its w_down differs from
    its pretrained weight (a training run has moved it)."""
    added = []
    g = torch.Generator().manual_seed(11)
    for index in layers:
        layer = model.transformer.layers[index]
        dim = layer.gating.linear_in.in_features
        ttt = ClientTTTGating(layer.gating, dim, chunk_size, announce=announce)
        if trained:
            with torch.no_grad():
                ttt.w_down.copy_(0.05 * torch.randn(dim, dim, generator=g))
        layer.gating = ttt
        added.append(ttt)
    for module in model.modules():  # moshi caches streaming children: forget them so the new layers stream
        if isinstance(module, StreamingModule):
            module._cached_children = None
    return added
