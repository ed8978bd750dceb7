/*
 * The method table: every rpc of proto/ once, with its kind, handler and roles. Methods whose
 * issue has not landed answer UNIMPLEMENTED naming themselves and the issue.
 * tests/unit/test_methods.c checks this table against the protobuf-c service descriptors,
 * and the integration suite checks kinds and roles against the proto (--list-methods).
 */
#include "domicile/api.h"
#include "domicile/auth.h"

#include "domicile/v1/customers.pb-c.h"
#include "domicile/v1/keys.pb-c.h"
#include "domicile/v1/records.pb-c.h"
#include "domicile/v1/regions.pb-c.h"
#include "domicile/v1/subject_rights.pb-c.h"
#include "domicile/v1/transfers.pb-c.h"
#include "domicile/peer.h"
#include "domicile/peer/v1/peer.pb-c.h"
#include "grpc/health/v1/health.pb-c.h"
#include "grpc/reflection/v1alpha/reflection.pb-c.h"

#define U     DM_RPC_UNARY
#define S     DM_RPC_SERVER_STREAM
#define C     DM_RPC_CLIENT_STREAM
#define B     DM_RPC_BIDI_STREAM
#define V1(x) &domicile__v1__##x##__descriptor
#define HC(x) &grpc__health__v1__##x##__descriptor
#define RF(x) &grpc__reflection__v1alpha__##x##__descriptor
#define PR(x) &domicile__peer__v1__##x##__descriptor
#define M(svc, name, kind, in, out, handler, issue, roles)                                         \
    {                                                                                              \
        "/" svc "/" name, kind, in, out, handler, roles, issue                                     \
    }
/* Roles per method, as stated in the proto's "Roles:" comments (a test checks both agree). */
#define PUBLIC     DM_ROLES_PUBLIC
#define R_SVC      (DM_ROLE_SERVICE | DM_ROLE_ADMIN)
#define R_SVC_READ (DM_ROLE_SERVICE | DM_ROLE_READER | DM_ROLE_ADMIN)
#define R_PO       (DM_ROLE_PRIVACY_OFFICER | DM_ROLE_ADMIN)
#define R_PO_AUD   (DM_ROLE_PRIVACY_OFFICER | DM_ROLE_AUDITOR | DM_ROLE_ADMIN)
#define R_AUD      (DM_ROLE_AUDITOR | DM_ROLE_ADMIN)
#define R_OPS      (DM_ROLE_OPERATOR | DM_ROLE_ADMIN)
/* Gateways of other regions only: the authorizer checks the caller's certificate, the
 * handler the asserted principal's roles for the method it serves. */
#define R_PEER DM_ROLES_GATEWAY

static const dm_method_t methods[] = {
    M("grpc.health.v1.Health", "Check", U, HC(health_check_request), HC(health_check_response),
      dm_health_check, NULL, PUBLIC),
    M("grpc.health.v1.Health", "Watch", S, HC(health_check_request), HC(health_check_response),
      dm_health_watch, NULL, PUBLIC),
    M("domicile.v1.CustomersService", "RegisterCustomer", U, V1(register_customer_request),
      V1(register_customer_response), dm_customers_register, NULL, R_SVC),
    M("domicile.v1.CustomersService", "GetCustomer", U, V1(get_customer_request),
      V1(get_customer_response), dm_customers_get, NULL, R_SVC_READ),
    M("domicile.v1.CustomersService", "CloseCustomer", U, V1(close_customer_request),
      V1(close_customer_response), dm_customers_close, NULL, R_SVC),
    M("domicile.v1.RecordsService", "PutRecord", U, V1(put_record_request), V1(put_record_response),
      dm_records_put, NULL, R_SVC),
    M("domicile.v1.RecordsService", "GetRecord", U, V1(get_record_request), V1(get_record_response),
      dm_records_get, NULL, R_SVC_READ),
    M("domicile.v1.RecordsService", "ListRecords", S, V1(list_records_request),
      V1(list_records_response), dm_records_list, NULL, R_SVC_READ),
    M("domicile.v1.RecordsService", "DeleteRecord", U, V1(delete_record_request),
      V1(delete_record_response), dm_records_delete, NULL, R_SVC),
    M("domicile.v1.RecordsService", "BulkPutRecords", C, V1(bulk_put_records_request),
      V1(bulk_put_records_response), dm_records_bulk_put, NULL, R_SVC),
    M("domicile.v1.SubjectRightsService", "Erase", U, V1(erase_request), V1(erase_response),
      dm_dsr_erase, NULL, R_PO),
    M("domicile.v1.SubjectRightsService", "Export", S, V1(export_request), V1(export_response),
      dm_dsr_export, NULL, R_PO),
    M("domicile.v1.SubjectRightsService", "RestrictProcessing", U, V1(restrict_processing_request),
      V1(restrict_processing_response), dm_dsr_restrict, NULL, R_PO),
    M("domicile.v1.SubjectRightsService", "UnrestrictProcessing", U,
      V1(unrestrict_processing_request), V1(unrestrict_processing_response), dm_dsr_unrestrict,
      NULL, R_PO),
    M("domicile.v1.SubjectRightsService", "Object", U, V1(object_request), V1(object_response),
      dm_dsr_object, NULL, R_PO),
    M("domicile.v1.SubjectRightsService", "Withdraw", U, V1(withdraw_request),
      V1(withdraw_response), dm_dsr_withdraw, NULL, R_PO),
    M("domicile.v1.SubjectRightsService", "GetRequest", U, V1(get_request_request),
      V1(get_request_response), dm_dsr_get, NULL, R_PO_AUD),
    M("domicile.v1.SubjectRightsService", "ListRequests", S, V1(list_requests_request),
      V1(list_requests_response), dm_dsr_list, NULL, R_PO_AUD),
    M("domicile.v1.SubjectRightsService", "ExtendDeadline", U, V1(extend_deadline_request),
      V1(extend_deadline_response), dm_dsr_extend, NULL, R_PO),
    M("domicile.v1.SubjectRightsService", "Locate", U, V1(locate_request), V1(locate_response),
      dm_dsr_locate, NULL, R_PO),
    M("domicile.v1.TransfersService", "ListTransfers", S, V1(list_transfers_request),
      V1(list_transfers_response), dm_transfers_list, NULL, R_AUD),
    M("domicile.v1.TransfersService", "Report", U, V1(report_request), V1(report_response),
      dm_transfers_report, NULL, R_AUD),
    M("domicile.v1.TransfersService", "VerifyLedger", U, V1(verify_ledger_request),
      V1(verify_ledger_response), dm_transfers_verify, NULL, R_AUD),
    M("domicile.v1.RegionsService", "ListRegions", U, V1(list_regions_request),
      V1(list_regions_response), dm_regions_list, NULL, R_OPS),
    M("domicile.v1.RegionsService", "Fence", U, V1(fence_request), V1(fence_response),
      dm_regions_fence, NULL, R_OPS),
    M("domicile.v1.RegionsService", "Unfence", U, V1(unfence_request), V1(unfence_response),
      dm_regions_unfence, NULL, R_OPS),
    /* Last, so that the indices above (metrics, fuzz seeds) stay as they were. */
    M("grpc.reflection.v1alpha.ServerReflection", "ServerReflectionInfo", B,
      RF(server_reflection_request), RF(server_reflection_response), dm_reflection_info, NULL,
      PUBLIC),
    /* Gateway to gateway (src/peer), after the public API. */
    M("domicile.peer.v1.PeerService", "Exec", U, PR(exec_request), PR(exec_response), dm_peer_exec,
      NULL, R_PEER),
    M("domicile.peer.v1.PeerService", "RegionInfo", U, PR(region_info_request),
      PR(region_info_response), dm_peer_region_info, NULL, R_PEER),
    M("domicile.peer.v1.PeerService", "ExportPart", S, PR(export_part_request),
      PR(export_part_response), dm_peer_export_part, NULL, R_PEER),
    /* Key custody (issue 17): after everything, so that earlier indices stay as they were. */
    M("domicile.v1.KeysService", "RotateKey", U, V1(rotate_key_request), V1(rotate_key_response),
      dm_keys_rotate, NULL, R_OPS),
    M("domicile.v1.KeysService", "GetKeyStatus", U, V1(get_key_status_request),
      V1(get_key_status_response), dm_keys_status, NULL, R_OPS),
    M("domicile.v1.KeysService", "RetireKeyVersion", U, V1(retire_key_version_request),
      V1(retire_key_version_response), dm_keys_retire, NULL, R_OPS),
};

/* Kubernetes' grpc probes call Check, never Watch: a Watch is a stream held open for good,
 * which no stranger on a plaintext port should be able to pin. */
static const dm_method_t probe_method =
    M("grpc.health.v1.Health", "Check", U, HC(health_check_request), HC(health_check_response),
      dm_health_probe_check, NULL, PUBLIC);

const dm_method_t *dm_api_probe_method(void)
{
    return &probe_method;
}

const char *dm_api_method_path(dm_handler_fn handler)
{
    for (size_t i = 0; i < DM_ARRAY_LEN(methods); i++)
        if (methods[i].handler == handler)
            return methods[i].path;
    return "";
}

const dm_method_t *dm_api_methods(size_t *n)
{
    *n = DM_ARRAY_LEN(methods);
    return methods;
}
