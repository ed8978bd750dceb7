/*
 * The process-wide objects every handler reaches through dm_call_app(). Created by the daemon
 * (src/daemon/main.c) before the server starts; destroyed after it has stopped.
 */
#ifndef DOMICILE_APP_H
#define DOMICILE_APP_H

#include "domicile/config.h"
#include "domicile/region.h"
#include "domicile/server.h"

typedef struct dm_health dm_health_t;

typedef struct dm_app {
    dm_config_t *cfg;
    dm_regions_t *regions;
    dm_health_t *health;
    dm_server_t *server;
} dm_app_t;

#endif
