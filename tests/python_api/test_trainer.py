"""The adapted model trains under transformers.Trainer (tiny config-built BERT, no downloads)."""
import pytest
import torch

import python_api

transformers = pytest.importorskip("transformers")


class _Toy(torch.utils.data.Dataset):
    def __init__(self, n=32, seq=12, vocab=100):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(5, vocab, (n, seq), generator=g)
        self.labels = (self.ids[:, 0] > vocab // 2).long()

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.labels[i]}


@pytest.mark.parametrize("share", [None, "A"])
def test_trainer_trains_adapters_only(tmp_path, share):
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=32, num_labels=2)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(cfg)
    python_api.apply_adapters(model, ["query", "value"], r=4, alpha=8, share=share, modules_to_save=["classifier"])
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable) and any("classifier" in n for n in trainable)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=4,
                                          learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no",
                                          logging_steps=1, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Toy())
    out = trainer.train()
    assert torch.isfinite(torch.tensor(out.training_loss))
    params = dict(model.named_parameters())
    for n, before in frozen.items():
        assert torch.equal(params[n], before), f"frozen {n} changed"
    moved = [n for n, before in trainable.items() if not torch.equal(params[n], before)]
    assert any("lora_B" in n for n in moved), moved
