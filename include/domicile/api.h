/*
 * The API: the method table (every rpc of proto/, with its handler or the issue that will
 * build it) and the service modules behind it.
 */
#ifndef DOMICILE_API_H
#define DOMICILE_API_H

#include "domicile/app.h"
#include "domicile/server.h"

/** The method table, in proto order (reflection last). Static storage. */
const dm_method_t *dm_api_methods(size_t *n);

/** The path of the method served by `handler` ("" when none): for calls to peers. */
const char *dm_api_method_path(dm_handler_fn handler);
/** Health service state. Created before the server starts; it watches the regions. */
dm_health_t *dm_health_create(dm_app_t *app);
/** Shutdown began: every service reports NOT_SERVING and Watch streams end. */
void dm_health_shutdown(void *health);
void dm_health_destroy(dm_health_t *h);
/** Region-change listener to pass to dm_regions_on_change(). */
void dm_health_region_changed(void *health, dm_region_t *region, bool serving);

/** Health service name of readiness (src/api/health.c): the own region has answered once. */
#define DM_HEALTH_READY_SERVICE "domicile.gateway.ready"
void dm_health_check(dm_call_t *call);
/**
 * grpc.health.v1.Health/Check as the probe listener serves it: services "" and
 * DM_HEALTH_READY_SERVICE, with the same meaning as on the main listener; any other name is
 * NOT_FOUND with one message.
 */
void dm_health_probe_check(dm_call_t *call);
/** The method table row of the probe listener (dm_server_add_probe). Static storage. */
const dm_method_t *dm_api_probe_method(void);
void dm_records_put(dm_call_t *call);
void dm_records_get(dm_call_t *call);
void dm_records_list(dm_call_t *call);
void dm_records_delete(dm_call_t *call);
void dm_records_bulk_put(dm_call_t *call);
void dm_customers_register(dm_call_t *call);
void dm_customers_get(dm_call_t *call);
void dm_customers_close(dm_call_t *call);
void dm_transfers_list(dm_call_t *call);
void dm_regions_list(dm_call_t *call);
void dm_regions_fence(dm_call_t *call);
void dm_regions_unfence(dm_call_t *call);
void dm_dsr_erase(dm_call_t *call);
void dm_dsr_export(dm_call_t *call);
void dm_dsr_restrict(dm_call_t *call);
void dm_dsr_unrestrict(dm_call_t *call);
void dm_dsr_object(dm_call_t *call);
void dm_dsr_withdraw(dm_call_t *call);
void dm_dsr_get(dm_call_t *call);
void dm_dsr_list(dm_call_t *call);
void dm_dsr_extend(dm_call_t *call);
void dm_dsr_locate(dm_call_t *call);
void dm_transfers_report(dm_call_t *call);
void dm_transfers_verify(dm_call_t *call);
void dm_health_watch(dm_call_t *call);
/** domicile.v1.KeysService (src/api/keys.c). */
void dm_keys_rotate(dm_call_t *call);
void dm_keys_status(dm_call_t *call);
void dm_keys_retire(dm_call_t *call);
/** domicile.peer.v1.PeerService/RegionInfo: this region as its own gateway sees it. */
void dm_peer_region_info(dm_call_t *call);
/** domicile.peer.v1.PeerService/ExportPart: this region's part of an Export, for a peer. */
void dm_peer_export_part(dm_call_t *call);
/** grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo (src/api/reflection.c; the
 * descriptors: src/server/reflection.c). */
void dm_reflection_info(dm_call_t *call);

#endif
