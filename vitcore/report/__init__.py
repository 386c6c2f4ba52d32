"""What finished runs show a person: the results table (`python -m vitcore.report`), figures
(`python -m vitcore.report.plots`) and attention and confusion images."""
