"""The load side: the planner (:mod:`dcplan.load.planner`), its report
(:mod:`dcplan.load.report`) and the safe reader (:mod:`dcplan.load.safe`)."""
