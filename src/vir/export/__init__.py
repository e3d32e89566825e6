"""The way out: a run directory as a transformers `LlavaForConditionalGeneration` directory (`hf_llava`), a
Jinja chat template equal to the training template (`chat_template`), and the export's model card (`card`)."""
