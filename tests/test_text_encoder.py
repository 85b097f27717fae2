import torch

from facevid.config import resolve_pretrained
from models.text_encoder import FrozenTextEncoder


def test_bundled_encoder_loads_offline_and_is_frozen():
    encoder = FrozenTextEncoder(resolve_pretrained("bundled:all-MiniLM-L6-v2"), max_length=16)
    assert encoder.hidden_size == 384
    assert not any(p.requires_grad for p in encoder.parameters())
    hidden, mask = encoder(["a woman with red hair talking", ""])
    assert hidden.shape == (2, 16, 384) and mask.shape == (2, 16)
    assert mask[0].sum() > mask[1].sum() >= 1  # the empty prompt still has [CLS] [SEP]
    again, _ = encoder(["a woman with red hair talking"])
    assert torch.equal(again[0], hidden[0])
    # Real pretrained weights: related prompts are closer than unrelated ones.
    emb, m = encoder(["red hair", "ginger hair", "a blue car on a highway"])
    pooled = torch.nn.functional.normalize((emb * m[..., None]).sum(1) / m.sum(1, keepdim=True), dim=-1)
    assert pooled[0] @ pooled[1] > pooled[0] @ pooled[2]
