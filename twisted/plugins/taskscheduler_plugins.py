from twisted.application.service import ServiceMaker

server = ServiceMaker(
    "taskscheduler server",
    "taskscheduler.server.tap",
    "The taskscheduler API and coordination server.",
    "taskscheduler-server",
)
agent = ServiceMaker(
    "taskscheduler agent",
    "taskscheduler.agent.tap",
    "The taskscheduler agent: runs scheduled commands on this host.",
    "taskscheduler-agent",
)
