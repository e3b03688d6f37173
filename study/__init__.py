"""The experiments behind the README's Results: ``python -m study COMMAND`` (see __main__).

Each step is its own module and writes its own files under one study folder
(:class:`study.paths.StudyPaths`, ``work/study`` of the repository unless ``--root`` or
``$VESSEL_SEG_STUDY_DIR`` says otherwise), never under the current directory:

* :mod:`study.data` writes the phantom federations and the test sets;
* :mod:`study.runs` trains one run (``python -m train``, resumable);
* :mod:`study.postprocessing` chooses a run's component cleaning on its validation cases
  and writes it to ``results/<run>/postprocessing.json``; applying it is a separate step;
* :mod:`study.tables` applies the chosen cleaning and writes the tables and curves;
* :mod:`study.ship` copies a run's folds and its chosen cleaning into a weights folder
  (``weights/`` only when asked to).
"""
