"""Where studies run: this process, a pool of worker processes, or Ray actors."""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable, Iterator

from ..errors import BatchError
from .worker import ModelSpec, Task, run_task

log = logging.getLogger(__name__)

class Executor:
    """``with Executor(...) as execute: for result in execute(tasks, on_start)``: results as they finish.

    At most one task per worker is handed out at a time, and ``on_start(task)`` is called just
    before, so that the studies the database marks as in flight are the ones really running."""

    def __init__(self, engine: str, spec: ModelSpec, *, workers: int, address: str | None):
        self.engine, self.spec, self.workers, self.address = engine, spec, workers, address
        self._pool = None
        self._ray_started = False
        self._actors: list = []
        self._actor_class = None

    def __enter__(self) -> Callable[..., Iterator[dict[str, Any]]]:
        return self.run

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        if self._actors:
            import ray

            for actor in self._actors:
                ray.kill(actor)
        if self._ray_started:
            import ray

            ray.shutdown()

    def run(self, tasks: list[Task], on_start: Callable[[Task], None]) -> Iterator[dict[str, Any]]:
        if not tasks:
            return
        if self.engine == "ray":
            yield from self._ray(tasks, on_start)
        elif self.workers == 1:
            for task in tasks:
                on_start(task)
                yield run_task(task, self.spec)
        else:
            yield from self._processes(tasks, on_start)

    # local worker processes
    def _new_pool(self):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        return ProcessPoolExecutor(max_workers=self.workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_watch_parent, initargs=(os.getpid(),))

    def _processes(self, tasks: list[Task], on_start) -> Iterator[dict[str, Any]]:
        """A pool of processes. When one dies, the pool breaks and every study it was running is
        suspect: each runs again alone, and one that breaks the pool alone is that study's failure."""
        from concurrent.futures import FIRST_COMPLETED, wait
        from concurrent.futures.process import BrokenProcessPool

        queue = list(tasks)
        suspects: set[str] = set()
        running: dict[Any, Task] = {}
        while queue or running:
            if self._pool is None:
                self._pool = self._new_pool()
            while queue and len(running) < self.workers:
                alone = queue[0].study.case_id in suspects
                if alone and running or any(t.study.case_id in suspects for t in running.values()):
                    break
                task = queue.pop(0)
                on_start(task)
                running[self._pool.submit(run_task, task, self.spec)] = task
            done, _ = wait(list(running), return_when=FIRST_COMPLETED)
            broken = []
            for future in done:
                task = running.pop(future)
                try:
                    yield future.result()
                except BrokenProcessPool:
                    broken.append(task)
            if broken:  # the pool is unusable: every study still in it shares the suspicion
                broken += list(running.values())
                running.clear()
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = None
                for task in broken:
                    if task.study.case_id in suspects and len(broken) == 1:
                        yield _died(task, "the worker process died while running this study (twice; a crash or "
                                          "the out-of-memory killer); run fewer workers or check its image")
                    else:
                        suspects.add(task.study.case_id)
                        queue.insert(0, task)

    # Ray actors
    def _ray(self, tasks: list[Task], on_start) -> Iterator[dict[str, Any]]:
        from ..errors import require

        ray = require("ray", "the Ray engine", extra="ray")
        if not ray.is_initialized():
            try:
                ray.init(address=self.address, include_dashboard=False, log_to_driver=False)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise BatchError(f"expected a Ray cluster at {self.address or 'a new local one'}, found none "
                                 f"({' '.join(str(exc).split())[:160]}); check --ray-address") from None
            self._ray_started = True
        if not self._actors:
            self._start_actors(ray)
        idle = list(self._actors)
        queue = list(tasks)
        pending: dict[Any, tuple[Task, Any]] = {}
        while queue or pending:
            while queue and idle:
                actor, task = idle.pop(), queue.pop(0)
                on_start(task)
                pending[actor.run.remote(task)] = (task, actor)
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            task, actor = pending.pop(ref)
            try:
                result = ray.get(ref)
            except ray.exceptions.RayActorError as exc:  # the actor's process died: only its study fails
                self._actors.remove(actor)
                replacement = self._actor_class.remote(self.spec)
                self._actors.append(replacement)
                idle.append(replacement)
                yield _died(task, f"the Ray worker died while running this study "
                                  f"({' '.join(str(exc).split())[:120]}); run the batch again to retry it")
                continue
            except ray.exceptions.RayError as exc:
                idle.append(actor)
                yield _died(task, f"Ray could not run this study ({type(exc).__name__}); run the batch again")
                continue
            idle.append(actor)
            yield result

    def _start_actors(self, ray) -> None:
        """``workers`` actors, each with the CPUs it can have on one node and a GPU (or a share) when there is one."""
        import dataclasses

        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
        cpus = max(1, min(self.spec.threads or 1, int(max((n.get("CPU", 1) for n in nodes), default=1))))
        gpus = ray.cluster_resources().get("GPU", 0)
        gpu_share = min(1.0, gpus / self.workers) if gpus else 0
        self.spec = dataclasses.replace(self.spec, threads=cpus)
        self._actor_class = ray.remote(num_cpus=cpus, num_gpus=gpu_share)(RayStudyWorker)
        self._actors = [self._actor_class.remote(self.spec) for _ in range(self.workers)]
        try:
            ray.get([a.ready.remote() for a in self._actors], timeout=RAY_READY_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            raise BatchError(f"expected {self.workers} Ray workers with {cpus} CPU(s)"
                             f"{f' and {gpu_share:g} GPU' if gpu_share else ''} each, found the cluster could not "
                             f"start them in {RAY_READY_TIMEOUT_S} s (it has {ray.cluster_resources()}); use fewer "
                             "--workers or --threads") from None


#: how long Ray may take to place and start the workers before the batch gives up
RAY_READY_TIMEOUT_S = 300


def _died(task: Task, error: str) -> dict[str, Any]:
    return {"case_id": task.study.case_id, "status": "failed", "stage": "worker", "error": error}


def _watch_parent(parent: int) -> None:
    """In a pool worker: exit when the batch that started it is gone (a killed driver leaves no orphans)."""
    import threading

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, daemon=True, name="medsam3d-parent-watch").start()


class RayStudyWorker:
    """A Ray actor: loads its model once (on first study) and runs studies one at a time."""

    def __init__(self, spec: ModelSpec):
        self.spec = spec
        from .worker import cap_threads

        cap_threads(spec.threads)

    def ready(self) -> bool:
        return True

    def run(self, task: Task) -> dict[str, Any]:
        return run_task(task, self.spec)


