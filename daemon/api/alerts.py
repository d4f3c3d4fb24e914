"""The alerts API: ``/api/v1/alerts`` (webhook channels) and their deliveries."""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.requests import Request

from ember._alert_types import (
    AlertChannel,
    AlertChannelList,
    AlertDeliveryList,
    CreateAlertRequest,
)
from ember.daemon.api.routing import RouteSpec, over_tcp, read_body, read_json

if TYPE_CHECKING:
    from ember.daemon.api.host import ApiDaemon


async def create_alert(daemon: ApiDaemon, request: Request, env: str) -> AlertChannel:
    req: CreateAlertRequest = read_json(await read_body(request, 16 * 1024), CreateAlertRequest)
    return await daemon.engine.alerts.create(env, req)


async def list_alerts(daemon: ApiDaemon, request: Request, env: str) -> AlertChannelList:
    # A remote key may see its channels, not their signing secrets.
    found = await daemon.engine.alerts.channels(env, with_secrets=not over_tcp(request))
    return AlertChannelList(data=found)


async def delete_alert(daemon: ApiDaemon, request: Request, env: str) -> AlertChannel:
    return await daemon.engine.alerts.delete(env, request.path_params["alert_id"])


async def list_deliveries(daemon: ApiDaemon, request: Request, env: str) -> AlertDeliveryList:
    return AlertDeliveryList(data=await daemon.engine.alerts.deliveries(env))


ALERT_ROUTES: tuple[RouteSpec, ...] = (
    RouteSpec(
        "POST",
        "/api/v1/alerts",
        create_alert,
        "Add a webhook alert channel (the answer holds its signing secret)",
        request=CreateAlertRequest,
        response=AlertChannel,
    ),
    RouteSpec("GET", "/api/v1/alerts", list_alerts, "Alert channels", response=AlertChannelList),
    RouteSpec(
        "GET",
        "/api/v1/alerts/deliveries",
        list_deliveries,
        "Recent alert deliveries, newest first",
        response=AlertDeliveryList,
    ),
    RouteSpec(
        "DELETE",
        "/api/v1/alerts/{alert_id}",
        delete_alert,
        "Remove an alert channel",
        response=AlertChannel,
    ),
)
