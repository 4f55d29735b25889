"""Chat: the format conversations are rendered in (format), conversation files (conversations), the calculator
tool and its interception during generation (tools), and the interactive chat (repl)."""
