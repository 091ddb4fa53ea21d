"""Special tokens. They take ids 0..len-1 in this order in every tokenizer we train."""

EOT = "<|endoftext|>"  # document separator; also used as BOS
FIM_PREFIX = "<|fim_prefix|>"
FIM_MIDDLE = "<|fim_middle|>"
FIM_SUFFIX = "<|fim_suffix|>"
FIM_PAD = "<|fim_pad|>"
SYSTEM_START, SYSTEM_END = "<|system_start|>", "<|system_end|>"
USER_START, USER_END = "<|user_start|>", "<|user_end|>"
ASSISTANT_START, ASSISTANT_END = "<|assistant_start|>", "<|assistant_end|>"
TOOL_CALL_START, TOOL_CALL_END = "<|tool_call_start|>", "<|tool_call_end|>"
TOOL_OUTPUT_START, TOOL_OUTPUT_END = "<|tool_output_start|>", "<|tool_output_end|>"

# The label of a position that is not trained (PyTorch cross-entropy's default ignore_index):
# chat renderers mask prompts with it, the model's loss skips it.
IGNORE_INDEX = -100

SPECIAL_TOKENS = [
    EOT, FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX, FIM_PAD,
    SYSTEM_START, SYSTEM_END, USER_START, USER_END, ASSISTANT_START, ASSISTANT_END,
    TOOL_CALL_START, TOOL_CALL_END, TOOL_OUTPUT_START, TOOL_OUTPUT_END,
]

# The pre-tokenizer split: exactly Llama 3's regex, so GGUF exports can declare the
# "llama-bpe" pre-tokenizer that llama.cpp implements natively. Runs of spaces stay whole
# (indentation is one token), digits split in groups of at most three.
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
