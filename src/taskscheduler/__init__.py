"""taskscheduler: scheduled commands across a fleet, with their output collected."""
