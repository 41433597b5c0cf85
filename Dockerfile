FROM python:3.11-slim

# util-linux's setsid (in the base image) gives every run its own process group.
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY src ./src
COPY twisted ./twisted
RUN pip install --no-cache-dir . && rm -rf /src

# The server runs as `taskscheduler`. The commands the agent runs run as `taskrunner`, a
# user that owns none of the daemons' files (give it what your tasks need): in
# docker-compose.yml each agent starts as root only to run every command as taskrunner
# (--run-as). Fixed uids, so that volumes and host files agree on the owners.
RUN groupadd --system --gid 10001 taskscheduler \
    && useradd --system --uid 10001 --gid 10001 --create-home \
        --home-dir /var/lib/taskscheduler taskscheduler \
    && groupadd --system --gid 10002 taskrunner \
    && useradd --system --uid 10002 --gid 10002 --create-home \
        --home-dir /home/taskrunner taskrunner
USER 10001:10001
WORKDIR /var/lib/taskscheduler
# Named volumes mounted here start out with these owners and modes.
RUN mkdir -p agents server \
    && mkdir -m 700 secrets join
EXPOSE 8080 8081
# In a container: in the foreground (-n), and no pidfile, which a restart would trip on.
CMD ["twistd", "-n", "--pidfile=", "taskscheduler-server"]
