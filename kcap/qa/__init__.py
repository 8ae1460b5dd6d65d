"""Extractable knowledge: LoRA fine-tuning on QA pairs of half the people, scored on the
other half (kcap.qa.finetune), with the extractable bits beside the stored ones."""
