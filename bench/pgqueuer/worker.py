"""The PgQueuer side of the durable-runs benchmark: one worker process (bench.py starts two).

The same no-op work as Agentry's `bench/agents/runs_bench` and Celery's `tasks.py`:
  work  : does nothing (PgQueuer keeps no return value; its result is the job's final status);
  stamp : records when its body starts (time.time(), same host as the client) and sends it to the
          client by UDP, so the measurement adds no database write.
usage: python worker.py DSN
"""
import asyncio
import socket
import sys
import time

import asyncpg
from pgqueuer import Job, QueueManager
from pgqueuer.db import AsyncpgDriver
from pgqueuer.queries import Queries


async def main(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    qm = QueueManager(Queries(AsyncpgDriver(conn)))
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    @qm.entrypoint("work")
    async def work(job: Job) -> None:
        return None

    @qm.entrypoint("stamp")
    async def stamp(job: Job) -> None:
        started_at = time.time()
        i, port = job.payload.decode().split()[:2]
        udp.sendto(f"{i} {started_at}".encode(), ("127.0.0.1", int(port)))

    # batch_size 10 is PgQueuer's default; 5 s dequeue timeout: a lost NOTIFY costs at most that.
    await qm.run(dequeue_timeout=__import__("datetime").timedelta(seconds=5), batch_size=10)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
