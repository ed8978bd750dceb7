/*
 * domicilectl completion bash: a bash completion script made from the table of commands below
 * (commands, subcommands, their flags, and the values of flags that take a fixed set: --output,
 * --state, --kind, ...). Region codes, customer and request ids are not completed: they live in
 * the gateway, and completion must not call it.
 *
 * The table is the one place that lists every flag of every command; usage() in
 * domicilectl.c says what they do, and tests/integration/test_cli_output.py checks that every
 * flag listed here is one --help documents.
 */
#include <stdio.h>
#include <string.h>

#include "cli.h"

/*
 * A flag: "--name" (no value), "--name=" (a free value), "--name=a|b|c" (one of these),
 * "--name=@file", "--name=@dir".
 */
typedef struct command {
    const char *path;  /* "dsr list"; "" the global options */
    const char *flags; /* blank-separated */
} command_t;

#define OUTPUTS       "table|wide|tsv|json|jsonl"
#define DSR_FILE_OPTS "--customer= --reason= --request-id="
#define DRILL_OPTS                                                                                 \
    "--region= --duration= --state=@dir --json=@file --clients= --rate= --gateway= --victim= "     \
    "--victim-pid= --domicile-local=@file --help"

static const command_t commands[] = {
    {"", "--addr= --timeout= --token= --token-file=@file --purpose= --cacert=@file --cert=@file "
         "--key=@file --output=" OUTPUTS " --no-headers --help"},
    {"health", ""},
    {"watch", ""},
    {"customer", ""},
    {"customer register", ""},
    {"customer get", ""},
    {"customer close", ""},
    {"regions", ""},
    {"regions list", ""},
    {"regions fence", ""},
    {"regions unfence", ""},
    {"record", ""},
    {"record put", ""},
    {"record get", ""},
    {"record list", "--limit="},
    {"record delete", ""},
    {"transfers", ""},
    {"transfers report",
     "--from= --to= --basis= --purpose= --from-region= --to-region= "
     "--format=table|csv|json|markdown|html --output=table|wide|tsv|json|jsonl|csv|markdown|html "
     "--output-file=@file"},
    {"transfers list", "--basis= --region= --customer= --outcome=allowed|refused --purpose= "
                       "--from= --to= --from-region= --to-region= --principal= "
                       "--direction=read|write --subject= --limit="},
    {"transfers verify", ""},
    {"dsr", ""},
    {"dsr erase", DSR_FILE_OPTS},
    {"dsr restrict", DSR_FILE_OPTS},
    {"dsr unrestrict", DSR_FILE_OPTS},
    {"dsr object", DSR_FILE_OPTS},
    {"dsr withdraw", DSR_FILE_OPTS},
    {"dsr export", DSR_FILE_OPTS " --output-file=@file --allow-partial"},
    {"dsr status", ""},
    {"dsr list", "--overdue --due-within= --state=received|in_progress|done|failed "
                 "--kind=erase|export|restrict|unrestrict|object|withdraw --customer= --limit="},
    {"dsr locate", "--customer="},
    {"dsr extend", ""},
    {"drill", ""},
    {"drill failover", DRILL_OPTS " --output=table|wide|json|jsonl"},
    {"drill gateway", DRILL_OPTS " --output=table|wide|json|jsonl"},
    {"drill restore", "--region= --state=@dir --json=@file --rate= --gateway= "
                      "--domicile-local=@file --help"},
    {"keys", ""},
    {"keys status", ""},
    {"keys rotate", "--wait --no-wait"},
    {"keys retire", ""},
    {"completion", ""},
    {"completion bash", ""},
};

/* Writes `flags` as completion words: "--a --b" without their values. */
static void flag_words(FILE *f, const char *flags)
{
    const char *p = flags;
    bool first = true;
    while (*p) {
        while (*p == ' ')
            p++;
        if (!*p)
            break;
        size_t n = strcspn(p, " =");
        fprintf(f, "%s%.*s", first ? "" : " ", (int)n, p);
        first = false;
        p += strcspn(p, " ");
    }
}

/* Writes one `case` arm per flag of `flags` that takes a value: what completes it. */
static void value_arms(FILE *f, const char *flags)
{
    const char *p = flags;
    while (*p) {
        while (*p == ' ')
            p++;
        if (!*p)
            break;
        size_t len = strcspn(p, " ");
        const char *eq = memchr(p, '=', len);
        if (eq) {
            int nn = (int)(eq - p), vn = (int)(p + len - eq - 1);
            const char *v = eq + 1;
            if (vn == 0)
                fprintf(f, "            %.*s) return ;;\n", nn, p); /* a free value */
            else if (strncmp(v, "@file", 5) == 0)
                fprintf(f,
                        "            %.*s) compopt -o filenames 2>/dev/null; COMPREPLY=($(compgen "
                        "-f -- "
                        "\"$cur\")); return ;;\n",
                        nn, p);
            else if (strncmp(v, "@dir", 4) == 0)
                fprintf(f,
                        "            %.*s) compopt -o filenames 2>/dev/null; COMPREPLY=($(compgen "
                        "-d -- "
                        "\"$cur\")); return ;;\n",
                        nn, p);
            else {
                fprintf(f, "            %.*s) COMPREPLY=($(compgen -W \"", nn, p);
                for (int i = 0; i < vn; i++)
                    fputc(v[i] == '|' ? ' ' : v[i], f);
                fputs("\" -- \"$cur\")); return ;;\n", f);
            }
        }
        p += len;
    }
}

/* Every flag of every command that takes a value, for the loop that skips option values. */
static void valued_flags(FILE *f)
{
    char seen[4096] = " ";
    for (size_t i = 0; i < DM_ARRAY_LEN(commands); i++) {
        const char *p = commands[i].flags;
        while (*p) {
            while (*p == ' ')
                p++;
            if (!*p)
                break;
            size_t len = strcspn(p, " ");
            const char *eq = memchr(p, '=', len);
            if (eq) {
                char word[64];
                snprintf(word, sizeof(word), " %.*s ", (int)(eq - p), p);
                if (!strstr(seen, word) && strlen(seen) + strlen(word) < sizeof(seen)) {
                    fprintf(f, "|%.*s", (int)(eq - p), p);
                    strcat(seen, word + 1);
                }
            }
            p += len;
        }
    }
}

static void bash_script(FILE *f)
{
    fputs("# bash completion for domicilectl. Load it with\n"
          "#   source <(domicilectl completion bash)\n"
          "# or install it as /etc/bash_completion.d/domicilectl.\n"
          "_domicilectl_flags() {\n"
          "    case \"$1\" in\n",
          f);
    for (size_t i = 0; i < DM_ARRAY_LEN(commands); i++) {
        fprintf(f, "        \"%s\") echo \"", commands[i].path);
        flag_words(f, commands[i].flags);
        fputs("\" ;;\n", f);
    }
    fputs("    esac\n"
          "}\n"
          "_domicilectl_values() {\n"
          "    local cmd=$1 flag=$2 cur=$3\n"
          "    [[ $flag == -o ]] && flag=--output\n"
          "    case \"$cmd\" in\n",
          f);
    /* Command flags first: a command may give a global flag's name other values (--output). */
    for (size_t i = 1; i < DM_ARRAY_LEN(commands); i++) {
        if (!strchr(commands[i].flags, '='))
            continue;
        fprintf(f, "    \"%s\")\n        case \"$flag\" in\n", commands[i].path);
        value_arms(f, commands[i].flags);
        fputs("        esac ;;\n", f);
    }
    fputs("    esac\n        case \"$flag\" in\n", f);
    value_arms(f, commands[0].flags);
    fputs("        esac\n"
          "    return 1\n"
          "}\n"
          "_domicilectl() {\n"
          "    local cur=${COMP_WORDS[COMP_CWORD]} prev=\n"
          "    ((COMP_CWORD > 0)) && prev=${COMP_WORDS[COMP_CWORD-1]}\n"
          "    local i w cmd=\"\" try words=() skip=0\n"
          "    COMPREPLY=()\n"
          "    # The words before the cursor that are not options or their values.\n"
          "    for ((i = 1; i < COMP_CWORD; i++)); do\n"
          "        w=${COMP_WORDS[i]}\n"
          "        if ((skip)); then skip=0; continue; fi\n"
          "        case \"$w\" in\n"
          "            --) break ;;\n"
          "            -o",
          f);
    valued_flags(f);
    fputs(") skip=1 ;;\n"
          "            -*) ;;\n"
          "            *) words+=(\"$w\") ;;\n"
          "        esac\n"
          "    done\n"
          "    # The longest command the words start with; what follows are its arguments.\n"
          "    local n=0 k\n"
          "    for ((k = 1; k <= ${#words[@]}; k++)); do\n"
          "        try=\"${words[*]:0:k}\"\n"
          "        if [[ -n $(_domicilectl_known \"$try\") ]]; then cmd=$try; n=$k; fi\n"
          "    done\n"
          "    if [[ $prev == -* ]] && _domicilectl_values \"$cmd\" \"$prev\" \"$cur\"; then\n"
          "        return\n"
          "    fi\n"
          "    if [[ $cur == -* ]]; then\n"
          "        # Global options go before the command; --output and --no-headers anywhere.\n"
          "        local more=\"--output --no-headers --help\"\n"
          "        [[ -z $cmd ]] && more=$(_domicilectl_flags \"\")\n"
          "        COMPREPLY=($(compgen -W \"$(_domicilectl_flags \"$cmd\") $more\" -- "
          "\"$cur\" | sort -u))\n"
          "        return\n"
          "    fi\n"
          "    ((n < ${#words[@]})) && return  # arguments of the command: ids, not completed\n"
          "    local subs=\"\" c\n"
          "    while read -r c; do\n"
          "        subs+=\" $c\"\n"
          "    done < <(_domicilectl_subcommands \"$cmd\")\n"
          "    COMPREPLY=($(compgen -W \"$subs\" -- \"$cur\"))\n"
          "}\n",
          f);
    /* The command tree, for the two helpers above. */
    fputs("_domicilectl_known() {\n    case \"$1\" in\n", f);
    for (size_t i = 1; i < DM_ARRAY_LEN(commands); i++)
        fprintf(f, "        \"%s\") echo yes ;;\n", commands[i].path);
    fputs("    esac\n}\n_domicilectl_subcommands() {\n    case \"$1\" in\n", f);
    for (size_t i = 0; i < DM_ARRAY_LEN(commands); i++) {
        const char *parent = commands[i].path;
        size_t pn = strlen(parent);
        bool any = false;
        for (size_t k = 1; k < DM_ARRAY_LEN(commands); k++) {
            const char *c = commands[k].path;
            const char *rest = pn == 0 ? c : c + pn + 1;
            if (pn && (strncmp(c, parent, pn) != 0 || c[pn] != ' '))
                continue;
            if (strchr(rest, ' '))
                continue; /* a grandchild */
            if (!any)
                fprintf(f, "        \"%s\") echo \"", parent);
            fprintf(f, "%s%s", any ? "\n" : "", rest);
            any = true;
        }
        if (any)
            fputs("\" ;;\n", f);
    }
    fputs("    esac\n}\ncomplete -F _domicilectl domicilectl\n", f);
}

int dm_ctl_completion(int argc, char **argv)
{
    if (argc == 2 && strcmp(argv[1], "bash") == 0) {
        bash_script(stdout);
        return fflush(stdout) == 0 ? DM_EXIT_OK : DM_EXIT_FAILURE;
    }
    fprintf(stderr, "usage: domicilectl completion bash\n"
                    "  prints a bash completion script: source <(domicilectl completion bash)\n");
    return DM_EXIT_USAGE;
}
