"""HTTP servers: `single_stage` serves one local model behind the OpenAI API (with logprobs)."""
