"""Which instruction a text is encoded with, decided in one place for every way of encoding it.

An export holds one table of instructions, ``prompts(meta)``, keyed the way MTEB and
sentence-transformers key prompts: ``"<task name>-<query|document>"``, ``"<task name>"``,
``"<task type>-<query|document>"``, ``"<task type>"``, ``"query"``, ``"document"``.  The table is
written into ``config_sentence_transformers.json``; ``Encoder.encode_query`` / ``encode_document``
and ``mteb_model.AutoRegEmbedMTEB`` read it through ``instruction_for``, which resolves a key in
MTEB's own order (``mteb.models.abs_encoder.get_prompt_name``).  So sentence-transformers, MTEB
through sentence-transformers and our own wrapper encode the same task with the same instruction.
"""
from __future__ import annotations

STS_INSTRUCTION = "Retrieve semantically similar text."
# One instruction per MTEB task type (a passage reads the export's document instruction).
TASK_TYPE_INSTRUCTIONS = {
    "STS": STS_INSTRUCTION,
    "Summarization": STS_INSTRUCTION,
    "PairClassification": STS_INSTRUCTION,
    "BitextMining": STS_INSTRUCTION,
    "Retrieval-query": "Given a query, retrieve relevant passages that answer the query.",
    "Reranking-query": "Given a query, retrieve relevant documents.",
    "Classification": "Classify the given text.",
    "MultilabelClassification": "Classify the given text.",
    "Clustering": "Identify the topic or theme of the given text.",
}


def prompts(meta) -> dict[str, str]:
    """An export's table (``meta``: an ``ExportMeta``): the task-type instructions, then its own query
    and document instructions (its instruction where it names none)."""
    return {**TASK_TYPE_INSTRUCTIONS, "query": meta.query_instruction or meta.instruction,
            "document": meta.document_instruction or meta.instruction}


def instruction_for(table: dict[str, str], default: str, task_name: str | None = None,
                    task_type: str | None = None, side: str | None = None) -> str:
    """The most specific entry of ``table`` for a task and side ("query", "document" or None), in
    MTEB's order; ``default`` (the export's instruction) when nothing matches."""
    for key in (task_name, task_type):
        if key is None:
            continue
        if side and f"{key}-{side}" in table:
            return table[f"{key}-{side}"]
        if key in table:
            return table[key]
    return table.get(side, default) if side else default
