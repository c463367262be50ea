import ChatBridgeServer
import Foundation
import Testing
import Yams

/// What can be checked of the deployment kit without a container engine: every file parses, and names the
/// probes, ports, settings and limits the server really has.
@Suite struct DeploymentKitTests {
    static let root: String = {
        var directory = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
        while directory.path != "/" {
            if FileManager.default.fileExists(atPath: directory.appendingPathComponent("Package.swift").path) { return directory.path }
            directory.deleteLastPathComponent()
        }
        return FileManager.default.currentDirectoryPath
    }()

    func text(_ path: String) throws -> String { try String(contentsOfFile: "\(Self.root)/\(path)", encoding: .utf8) }
    func yaml(_ path: String) throws -> [String: Any] {
        try #require(try Yams.load(yaml: try text(path)) as? [String: Any], "\(path) is not a YAML mapping")
    }

    /// Every `CHATBRIDGE_…` variable a configuration can read: each key of the effective settings.
    static let knownVariables: Set<String> = Set(
        ChatBridgeConfiguration.from(values: [:]).effectiveSettings().map { "CHATBRIDGE_" + $0.key.uppercased().replacingOccurrences(of: ".", with: "_") })

    func variables(in text: String) -> Set<String> {
        let pattern = try! NSRegularExpression(pattern: "CHATBRIDGE_[A-Z0-9_]+")
        return Set(pattern.matches(in: text, range: NSRange(text.startIndex..., in: text)).compactMap { Range($0.range, in: text).map { String(text[$0]) } })
    }

    @Test func everyVariableTheKitSetsIsASetting() throws {
        for path in [
            "Dockerfile", "deploy/compose.yaml", "deploy/chatbridge.env.example", "deploy/kubernetes/configmap.yaml",
            "deploy/kubernetes/secret.example.yaml", "deploy/systemd/chatbridge.service",
        ] {
            let unknown = variables(in: try text(path)).subtracting(Self.knownVariables)
            #expect(unknown.isEmpty, "\(path) sets variables no setting reads: \(unknown.sorted())")
        }
    }

    @Test func theDockerfileBuildsStaticallyAndRunsAsAnUnprivilegedUserWithAHealthCheck() throws {
        let dockerfile = try text("Dockerfile")
        let stages = dockerfile.split(separator: "\n").filter { $0.hasPrefix("FROM ") }
        #expect(stages.count == 2)
        #expect(stages.first?.contains("swift:") == true && stages.last?.contains("slim") == true)
        #expect(dockerfile.contains("--static-swift-stdlib"))
        #expect(dockerfile.contains("USER chatbridge") && dockerfile.contains("--uid 10001"))
        #expect(dockerfile.contains(#"VOLUME ["/data"]"#) && dockerfile.contains("sqlite:/data/chatbridge.sqlite"))
        #expect(dockerfile.contains("EXPOSE 8080") && dockerfile.contains("CHATBRIDGE_SERVER_PORT=8080"))
        #expect(dockerfile.contains("HEALTHCHECK") && dockerfile.contains("http://127.0.0.1:8080/healthz"))
        let ignored = try text(".dockerignore").split(separator: "\n").map(String.init)
        #expect(ignored.contains(".build") && ignored.contains(".git"))
    }

    @Test func composeRunsTwoReplicasOnPostgreSQLBehindAProxy() throws {
        let compose = try yaml("deploy/compose.yaml")
        let services = try #require(compose["services"] as? [String: Any])
        #expect(Set(services.keys) == ["postgres", "chatbridge-1", "chatbridge-2", "proxy"])
        for name in ["chatbridge-1", "chatbridge-2"] {
            let service = try #require(services[name] as? [String: Any])
            let environment = try #require(service["environment"] as? [String: Any])
            let url = try #require(environment["CHATBRIDGE_DATABASE_URL"] as? String)
            #expect(url.hasPrefix("postgres://") && url.contains("@postgres:5432/"))
            #expect(environment["CHATBRIDGE_SERVER_PORT"] as? String == "8080")
            let health = try #require(service["healthcheck"] as? [String: Any])
            #expect((health["test"] as? [String])?.contains("http://127.0.0.1:8080/healthz") == true)
            let dependsOn = try #require(service["depends_on"] as? [String: Any])
            #expect((dependsOn["postgres"] as? [String: Any])?["condition"] as? String == "service_healthy")
        }
        let postgres = try #require(services["postgres"] as? [String: Any])
        #expect((postgres["volumes"] as? [String])?.first?.hasPrefix("pgdata:") == true)
        #expect((compose["volumes"] as? [String: Any])?.keys.contains("pgdata") == true)
        let proxy = try #require(services["proxy"] as? [String: Any])
        #expect((proxy["ports"] as? [String]) == ["8080:8080"])
        let nginx = try text("deploy/nginx.conf")
        #expect(nginx.contains("server chatbridge-1:8080") && nginx.contains("server chatbridge-2:8080") && nginx.contains("listen 8080"))
    }

    @Test func kubernetesRunsTwoProbedReplicasThatDrainBeforeTheyAreKilled() throws {
        let deployment = try yaml("deploy/kubernetes/deployment.yaml")
        #expect(deployment["kind"] as? String == "Deployment")
        let spec = try #require(deployment["spec"] as? [String: Any])
        #expect(spec["replicas"] as? Int == 2)
        let pod = try #require((spec["template"] as? [String: Any])?["spec"] as? [String: Any])
        let drain = Int(ChatBridgeConfiguration.from(values: [:]).server.drainTimeout.components.seconds)
        let container = try #require((pod["containers"] as? [[String: Any]])?.first)
        // The grace period covers the preStop pause and the drain.
        let preStop = try #require(((container["lifecycle"] as? [String: Any])?["preStop"] as? [String: Any])?["exec"] as? [String: Any])
        let pause = try #require((preStop["command"] as? [String]).flatMap { $0.last.flatMap(Int.init) })
        #expect((pod["terminationGracePeriodSeconds"] as? Int ?? 0) > pause + drain)
        #expect((container["ports"] as? [[String: Any]])?.first?["containerPort"] as? Int == 8080)
        let readiness = try #require((container["readinessProbe"] as? [String: Any])?["httpGet"] as? [String: Any])
        let liveness = try #require((container["livenessProbe"] as? [String: Any])?["httpGet"] as? [String: Any])
        #expect(readiness["path"] as? String == "/readyz" && liveness["path"] as? String == "/healthz")
        let resources = try #require(container["resources"] as? [String: Any])
        #expect((resources["limits"] as? [String: Any])?["memory"] != nil && (resources["requests"] as? [String: Any])?["memory"] != nil)
        let sources = try #require(container["envFrom"] as? [[String: Any]])
        #expect(sources.compactMap { ($0["configMapRef"] as? [String: Any])?["name"] as? String } == ["chatbridge"])
        #expect(sources.compactMap { ($0["secretRef"] as? [String: Any])?["name"] as? String } == ["chatbridge"])

        let service = try yaml("deploy/kubernetes/service.yaml")
        #expect(service["kind"] as? String == "Service")
        let secret = try yaml("deploy/kubernetes/secret.example.yaml")
        #expect(((secret["stringData"] as? [String: Any])?["CHATBRIDGE_DATABASE_URL"] as? String)?.hasPrefix("postgres://") == true)
        let budget = try yaml("deploy/kubernetes/pdb.yaml")
        #expect(budget["kind"] as? String == "PodDisruptionBudget")
        #expect((budget["spec"] as? [String: Any])?["minAvailable"] as? Int == 1)
        let kustomization = try yaml("deploy/kubernetes/kustomization.yaml")
        for resource in try #require(kustomization["resources"] as? [String]) {
            #expect(FileManager.default.fileExists(atPath: "\(Self.root)/deploy/kubernetes/\(resource)"))
        }
    }

    @Test func theSystemdUnitRestartsOnFailureDrainsAndIsHardened() throws {
        var settings: [String: String] = [:]
        for line in try text("deploy/systemd/chatbridge.service").split(separator: "\n") where !line.hasPrefix("#") {
            let parts = line.split(separator: "=", maxSplits: 1).map(String.init)
            if parts.count == 2 { settings[parts[0]] = parts[1] }
        }
        #expect(settings["ExecStart"]?.hasSuffix("chatbridge serve --config /etc/chatbridge/chatbridge.yaml") == true)
        #expect(settings["Restart"] == "on-failure")
        #expect(settings["KillSignal"] == "SIGTERM")
        let stop = Int(settings["TimeoutStopSec"]?.replacingOccurrences(of: "s", with: "") ?? "") ?? 0
        #expect(stop > Int(ChatBridgeConfiguration.from(values: [:]).server.drainTimeout.components.seconds))
        for option in ["NoNewPrivileges", "ProtectHome", "PrivateTmp", "DynamicUser"] { #expect(settings[option] == "yes", "\(option)") }
        #expect(settings["ProtectSystem"] == "strict")
        #expect(settings["Environment"]?.contains("sqlite:/var/lib/chatbridge/") == true && settings["StateDirectory"] == "chatbridge")
    }
}
