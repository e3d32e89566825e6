"""The way out: a run directory as a transformers `LlavaForConditionalGeneration` directory (`hf_llava`), as one
merged checkpoint or LLaVA's own layout (`merge`), a Jinja chat template equal to the training template
(`chat_template`), the export's model card (`card`), and where an export may land and how it is written whole
(`destination`)."""
