"""The paper's studies, one function (and one ``steerable experiment`` command) each."""
