"""The broker's Python SDK.

Developers: ``Client`` submits JAX functions as jobs and reads their results;
``package`` and ``package_step`` build the portable artifacts it uploads.
Providers: ``ProviderClient`` and ``run_allocation`` run the jobs the market
matched to their offers.
"""

from broker.portable.artifact import ALL_PLATFORMS, Artifact, ArtifactError, package, package_step
from broker.sdk.client import Client, Job, JobCancelled, JobFailed
from broker.sdk.http import BrokerError, BrokerUnavailable
from broker.sdk.provider import ProviderClient, run_allocation, run_work_order

__all__ = [
    "ALL_PLATFORMS",
    "Artifact",
    "ArtifactError",
    "BrokerError",
    "BrokerUnavailable",
    "Client",
    "Job",
    "JobCancelled",
    "JobFailed",
    "ProviderClient",
    "package",
    "package_step",
    "run_allocation",
    "run_work_order",
]
