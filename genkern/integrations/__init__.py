"""Adapters that put genkern's kernels under other libraries' models.

Each submodule imports the library it adapts, so importing genkern never imports them: e.g.
`import genkern.integrations.transformers` needs Hugging Face transformers installed.
"""
