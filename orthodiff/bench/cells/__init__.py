"""Running a bench's cells: one cell is one method trained and scored at one label fraction and seed
(``cell``); ``grid`` runs the cells missing from results.json, in one process or several;
``baselines_train`` trains the supervised reference networks a cell may name; ``ablation`` retrains
probe variants of a finished bench on its cached features. Every cell leaves a run directory and one
results row."""
