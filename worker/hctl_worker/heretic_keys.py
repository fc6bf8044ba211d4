"""heretic's setting names, read as this worker's.

The worker's settings follow heretic's names, so a heretic `config.toml` carries over. heretic
keys that mean the same thing under another name here (`upload_repo_id`, `keyword_markers`,
`[scorer.KeywordRate.prompts]`...) are renamed; heretic keys for features this worker does not
have (plots, interactive menus) and heretic's `trial_index` (an index into its Pareto front,
where `trial` here is a trial number) are accepted and ignored with a warning; anything else is
an error naming the key. Torch-free, like the settings.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from hctl_worker.errors import SettingsError
from hctl_worker.prompt_source import PROMPT_TABLES

# heretic keys that mean the same here under another name.
RENAMED_KEYS = {
    "upload_repo_id": "upload_repo",
    "upload_repo_private": "upload_private",
    "keyword_markers": "refusal_markers",
}

# heretic keys for things this worker does not do; accepted so a heretic config carries over.
IGNORED_HERETIC_KEYS = {
    "evaluate_model": "scoring another model is not supported",
    "reproduce": "reproduction files are not supported",
    "collect_reproducibles": "reproduction files are not supported",
    "offload_outputs_to_cpu": "outputs always go to the CPU",
    "response_prefix": "response prefixes are not supported",
    "chain_of_thought_skips": "response prefixes are not supported",
    "print_debug_information": "there is no debug printing",
    "print_residual_geometry": "there are no residual statistics",
    "plot_residuals": "there are no residual plots",
    "residual_plot_path": "there are no residual plots",
    "residual_plot_title": "there are no residual plots",
    "residual_plot_style": "there are no residual plots",
    "full_normalization_lora_rank": "edits are exact, not LoRA approximations",
    "winsorization_quantile": "winsorization is not supported",
    "study_checkpoint_dir": "the study lives in the job directory",
    "checkpoint_action": "the same job directory always continues its study",
    "n_additional_trials": "raise n_trials instead",
    "model_action": "set save_directory or upload_repo instead",
    "upload_reproducibility_information": "reproduction files are not supported",
    "ignore_mismatches": "reproduction files are not supported",
    "kl_divergence_scale": "objectives are the scorers' raw values",
    "kl_divergence_target": "objectives are the scorers' raw values",
    "print_responses": "responses are not printed",
    "multidirectional_som": "multi-direction (SOM) ablation is not supported",
    "som_x": "multi-direction (SOM) ablation is not supported",
    "som_y": "multi-direction (SOM) ablation is not supported",
    "som_iterations": "multi-direction (SOM) ablation is not supported",
    "som_lr": "multi-direction (SOM) ablation is not supported",
    "som_sigma": "multi-direction (SOM) ablation is not supported",
    "som_k": "multi-direction (SOM) ablation is not supported",
    "trusted_models": "set trust_remote_code instead",
    "trial_index": "it is an index into heretic's Pareto front; set trial to a trial number, as "
    "hctl-worker pareto lists them, or leave it unset to choose the best automatically",
}

# Keys of a heretic prompt table that only matter to heretic's plots.
IGNORED_PROMPT_KEYS = {"residual_plot_label", "residual_plot_color", "system_prompt"}


def translate_keys(
    raw: Mapping[str, Any], origin: str, fields: Collection[str]
) -> tuple[dict[str, Any], list[str]]:
    """Map a heretic-style table onto this worker's names (`fields`, the settings' names);
    returns the values and warnings. An unknown key is a SettingsError naming the closest."""
    values: dict[str, Any] = {}
    warnings: list[str] = []
    for key, value in raw.items():
        if key == "quantization":
            if value not in (None, "none"):
                raise SettingsError(
                    f"{origin}: quantization = '{value}' is not supported",
                    "Remove the quantization setting; the worker loads models unquantized.",
                )
            continue
        if key == "export_strategy":
            if value not in (None, "merge"):
                warnings.append(f"{origin}: export_strategy '{value}' ignored; exports are merged")
            continue
        if key == "scorer" and isinstance(value, Mapping):
            values.update(_translate_scorer_tables(value, origin, warnings))
            continue
        if key in IGNORED_HERETIC_KEYS:
            warnings.append(f"{origin}: '{key}' ignored ({IGNORED_HERETIC_KEYS[key]})")
            continue
        name = RENAMED_KEYS.get(key, key)
        if name not in fields:
            close = _closest(name, fields)
            suggestion = f"Did you mean '{close}'? " if close else ""
            raise SettingsError(
                f"{origin}: unknown setting '{key}'",
                suggestion + "config.default.toml lists every setting.",
            )
        if name in PROMPT_TABLES and isinstance(value, Mapping):
            value = _translate_prompt_table(value, f"{origin} [{key}]", warnings)
        values[name] = value
    return values, warnings


def _translate_prompt_table(
    table: Mapping[str, Any], origin: str, warnings: list[str]
) -> dict[str, Any]:
    kept = {}
    for key, value in table.items():
        if key in IGNORED_PROMPT_KEYS:
            warnings.append(f"{origin}: '{key}' ignored")
        else:
            kept[key] = value
    return kept


def _translate_scorer_tables(
    scorers: Mapping[str, Any], origin: str, warnings: list[str]
) -> dict[str, Any]:
    """heretic HEAD's `[scorer.KeywordRate]` / `[scorer.KLDivergence]` tables."""
    values: dict[str, Any] = {}
    for name, table in scorers.items():
        if not isinstance(table, Mapping):
            continue
        for key, value in table.items():
            where = f"{origin} [scorer.{name}]"
            if key == "prompts" and name == "KeywordRate":
                values["bad_evaluation_prompts"] = _translate_prompt_table(value, where, warnings)
            elif key == "prompts" and name == "KLDivergence":
                values["good_evaluation_prompts"] = _translate_prompt_table(value, where, warnings)
            elif key == "keyword_markers" and name == "KeywordRate":
                values["refusal_markers"] = value
            else:
                warnings.append(f"{where}: '{key}' ignored")
    return values


def _closest(name: str, candidates: Collection[str]) -> str | None:
    import difflib

    matches = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return matches[0] if matches else None


__all__ = ["IGNORED_HERETIC_KEYS", "IGNORED_PROMPT_KEYS", "RENAMED_KEYS", "translate_keys"]
