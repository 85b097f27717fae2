import torch

from facevid.hub import resolve_pretrained
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


def test_prompts_cut_at_max_length_are_reported_once(caplog):
    encoder = FrozenTextEncoder(resolve_pretrained("bundled:all-MiniLM-L6-v2"), max_length=8)
    long_prompt = "a person with long red hair and dark skin, smiling, talking, in a green park"
    with caplog.at_level("WARNING", logger="facevid"):
        hidden, mask = encoder(["red hair", long_prompt])
        encoder([long_prompt])
    assert hidden.shape == (2, 8, 384) and bool(mask[1].all())  # cut to max_length
    warnings = [r.getMessage() for r in caplog.records if "text_encoder.max_length=8" in r.getMessage()]
    assert len(warnings) == 1 and "1 of 2 prompts" in warnings[0]
