"""The taskscheduler agent: schedules and runs tasks on its host and reports results."""
