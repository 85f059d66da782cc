"""autoregembed.tools: the command line and the tools around a run: data check/convert, the memory planner (DEVELOPERS.md maps each module)."""
