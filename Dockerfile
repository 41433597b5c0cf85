FROM python:3.11-slim

# util-linux's setsid (in the base image) gives every run its own process group.
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY src ./src
COPY twisted ./twisted
RUN pip install --no-cache-dir . && rm -rf /src

# The daemons, and the commands the agent runs, run as this unprivileged user; give it
# what your tasks need. A fixed uid, so that volumes and host files agree on the owner.
RUN groupadd --system --gid 10001 taskscheduler \
    && useradd --system --uid 10001 --gid 10001 --create-home \
        --home-dir /var/lib/taskscheduler taskscheduler
USER 10001:10001
WORKDIR /var/lib/taskscheduler
# Named volumes mounted here start out with these owners and modes.
RUN mkdir -p agents server \
    && mkdir -m 700 secrets join
EXPOSE 8080 8081
# In a container: in the foreground (-n), and no pidfile, which a restart would trip on.
CMD ["twistd", "-n", "--pidfile=", "taskscheduler-server"]
